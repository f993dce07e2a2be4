//! The PostgreSQL wire protocol: framing, the messages the router reads or writes, the
//! errors it sends and the SQLSTATE codes it uses. No I/O here.

pub mod codec;
pub mod error;
pub mod messages;
pub mod sqlstate;

pub use codec::{decode_frame, decode_raw, Frame, FrameError, StartupPacket};
pub use error::PgError;
