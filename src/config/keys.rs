//! Finding every unknown key in the file before the typed parse.
//!
//! `deny_unknown_fields` stops at the first unknown key; operators fixing a file want all
//! of them at once. The known keys are taken from the serde model itself (the field list
//! serde derives for each struct), so this check cannot drift from the model.

use serde::de::{self, Deserialize, Deserializer, Visitor};
use serde_norway::Value;

use super::locate::KeyPath;
use super::{
    Config, ConfigError, DistributionConfig, PlacementConfig, PoolConfig, ShardConfig, TableConfig,
    UserConfig,
};

/// The key names serde accepts for struct `T`.
fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    // The capture always "fails" after recording the field list; that is the point.
    let _ = T::deserialize(FieldCapture(&mut fields));
    fields
}

/// A deserializer that records the field list serde passes to `deserialize_struct`.
struct FieldCapture<'a>(&'a mut &'static [&'static str]);

impl<'de> Deserializer<'de> for FieldCapture<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("fields captured"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
        identifier ignored_any
    }
}

/// Every key in `doc` that the model does not know, with its position in `src`.
pub(super) fn unknown_keys(doc: &Value, src: &str) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let root = KeyPath::root();
    check_mapping(doc, &root, fields_of::<Config>(), src, &mut errors);
    let Value::Mapping(top) = doc else {
        return errors;
    };
    let each = |key: &str, fields: &'static [&'static str], errors: &mut Vec<ConfigError>| {
        if let Some(Value::Sequence(items)) = top.get(key) {
            for (i, item) in items.iter().enumerate() {
                check_mapping(item, &root.key(key).index(i), fields, src, errors);
            }
        }
    };
    each("users", fields_of::<UserConfig>(), &mut errors);
    each("shards", fields_of::<ShardConfig>(), &mut errors);
    each("tables", fields_of::<TableConfig>(), &mut errors);
    each(
        "distributions",
        fields_of::<DistributionConfig>(),
        &mut errors,
    );
    if let Some(pool) = top.get("pool") {
        check_mapping(
            pool,
            &root.key("pool"),
            fields_of::<PoolConfig>(),
            src,
            &mut errors,
        );
    }
    if let Some(Value::Sequence(dists)) = top.get("distributions") {
        for (i, dist) in dists.iter().enumerate() {
            if let Some(Value::Sequence(places)) = dist.get("placement") {
                let base = root.key("distributions").index(i).key("placement");
                for (j, place) in places.iter().enumerate() {
                    let fields = fields_of::<PlacementConfig>();
                    check_mapping(place, &base.index(j), fields, src, &mut errors);
                }
            }
        }
    }
    errors.sort_by_key(|e| (e.line, e.column));
    errors
}

/// Report keys of `node` (if it is a mapping) that are not in `fields`.
fn check_mapping(
    node: &Value,
    path: &KeyPath,
    fields: &[&str],
    src: &str,
    errors: &mut Vec<ConfigError>,
) {
    let Value::Mapping(map) = node else {
        return;
    };
    for key in map.keys() {
        let name = match key {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => {
                let (line, column) = path.locate(src).unzip();
                errors.push(ConfigError {
                    path: path.to_string(),
                    message: "mapping keys must be plain names".into(),
                    line,
                    column,
                });
                continue;
            }
        };
        if fields.contains(&name.as_str()) {
            continue;
        }
        let key_path = path.key(&name);
        let (line, column) = key_path.locate_key(src).unzip();
        let mut message = format!("unknown key `{name}`");
        if let Some(near) = closest(&name, fields) {
            message.push_str(&format!(" (did you mean `{near}`?)"));
        }
        message.push_str(&format!("; expected one of: {}", fields.join(", ")));
        errors.push(ConfigError {
            path: key_path.to_string(),
            message,
            line,
            column,
        });
    }
}

/// The known key closest to a misspelled one, if it is plausibly a typo.
fn closest<'a>(name: &str, fields: &[&'a str]) -> Option<&'a str> {
    fields
        .iter()
        .map(|f| (edit_distance(name, f), *f))
        .filter(|(d, f)| *d <= 2.max(f.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, f)| f)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}
