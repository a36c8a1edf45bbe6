//! The Postgres wire protocol and statement classification, with no I/O:
//! [`frame`] cuts bytes into messages, [`classify`] says which statements
//! are writes and what they set the fencing variables to, [`cycle`] tracks
//! where the server is in answering (and which answers to hide or swap),
//! [`recent`] is one session's memory of its classifications,
//! [`split`] finds where the statements of a text begin, [`guard`] is the text of the database guard's call and what its refusal
//! looks like. The proxy's session loop (in the
//! `fencepost` crate) drives them.

pub mod classify;
pub mod cycle;
pub mod frame;
pub mod guard;
pub mod recent;
pub mod split;

pub use classify::{
    fingerprint, Classification, Classifier, CommentFence, FenceSetting, FenceVar,
    DEFAULT_WRITE_FUNCTIONS,
};
pub use frame::{BackendMsg, ClientMsg, Frame, FrameError, StartupKind, StartupPacket};
pub use recent::Recent;
