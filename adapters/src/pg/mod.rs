//! The Postgres wire protocol and statement classification, with no I/O:
//! [`frame`] cuts bytes into messages, [`classify`] says which statements
//! are writes and what they set the fencing variables to. The proxy's
//! session loop (in the binary) drives both.

pub mod classify;
pub mod frame;
pub mod guard;

pub use classify::{
    fingerprint, Classification, Classifier, CommentFence, FenceSetting, FenceVar,
    DEFAULT_WRITE_FUNCTIONS,
};
pub use frame::{BackendMsg, ClientMsg, Frame, FrameError, StartupKind, StartupPacket};
