//! The broker conformance suite, run against both brokers: the in-memory one (brokers of one
//! test share a bus, as nodes share Redis), and the Redis one on a real `redis-server` that
//! this test starts on a free port (each broker has its own connection, as nodes do).

mod common;

use std::sync::Arc;

use common::redis_server::RedisServer;
use gateway::test_util::{conformance, Broker, RedisBroker};
use gateway::test_util::{Bus, MemoryBroker};

#[tokio::test]
async fn memory_broker_conforms() {
    let bus = Bus::default();
    conformance::run_all(|sink| {
        let broker = Arc::new(MemoryBroker::on(&bus, sink)) as Arc<dyn Broker>;
        async move { broker }
    })
    .await;
}

#[tokio::test]
async fn redis_broker_conforms() {
    let server = RedisServer::start().await;
    let config = gateway::Config {
        redis_url: Some(server.url().into()),
        ..common::config()
    };
    conformance::run_all(|sink| {
        let config = config.clone();
        async move {
            let redis = gateway::test_util::Redis::connect(&config, Arc::default())
                .await
                .expect("connect");
            let b = RedisBroker::new(redis, sink, Arc::default(), &conformance::channels());
            b.load().await.expect("load the history functions");
            Arc::new(b) as Arc<dyn Broker>
        }
    })
    .await;
}
