mod common;

#[tokio::test]
async fn select_one_through_router() {
    let r = common::router().await;
    let c = common::connect(&r).await;
    let row = c
        .query_one("SELECT 1::int4 + $1::int4", &[&41i32])
        .await
        .expect("query");
    let v: i32 = row.get(0);
    assert_eq!(v, 42);
    let rows = c.simple_query("SELECT 1; SELECT 2").await.expect("simple");
    assert_eq!(
        rows.len(),
        6,
        "RowDescription, row and CommandComplete per statement"
    );
    r.stop().await;
}
