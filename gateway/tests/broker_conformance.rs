//! The broker conformance suite against the in-memory broker. The Redis broker runs the same
//! `run_all`.

use std::sync::Arc;

use gateway::broker::{conformance, memory::MemoryBroker, Broker};

#[tokio::test]
async fn memory_broker_conforms() {
    conformance::run_all(
        |sink| async move { Arc::new(MemoryBroker::new(sink)) as Arc<dyn Broker> },
    )
    .await;
}
