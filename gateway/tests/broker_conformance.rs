//! The broker conformance suite, run against both brokers: the in-memory one, and the Redis
//! one on a real `redis-server` that this test starts on a free port.

mod common;

use std::sync::Arc;

use common::redis_server::RedisServer;
use gateway::broker::{conformance, memory::MemoryBroker, redis::RedisBroker, Broker};

#[tokio::test]
async fn memory_broker_conforms() {
    conformance::run_all(
        |sink| async move { Arc::new(MemoryBroker::new(sink)) as Arc<dyn Broker> },
    )
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
            let redis = gateway::cluster::redis::Redis::connect(&config, Arc::default())
                .await
                .expect("connect");
            redis.set_sink(sink);
            Arc::new(RedisBroker(redis)) as Arc<dyn Broker>
        }
    })
    .await;
}
