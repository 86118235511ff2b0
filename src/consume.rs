//! The loop every durable pull consumer of a node runs: the participant SDK's
//! ([`sagaflow_participant::consume`]), shared so that both reopen, back off and give messages
//! back the same way.

pub use sagaflow_participant::consume::{open_durable, pull_forever, Flow, OpenError};
