//! A real `redis-server` per test, on a random port, that a test can kill and restart. Never
//! the machine's shared server on 6379.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::on_random_port;

/// A private Redis. Killed on drop.
pub struct RedisServer {
    pub port: u16,
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        Self::start_with(|_| Vec::new()).await
    }

    /// Starts with extra `redis-server` arguments, made for the port it gets.
    pub async fn start_with(extra: impl Fn(u16) -> Vec<String>) -> RedisServer {
        on_random_port(|port| {
            let mut s = RedisServer {
                port,
                extra: extra(port),
                child: None,
            };
            async move { s.spawn().await.then_some(s) }
        })
        .await
    }

    /// Runs `redis-server` on `self.port` and waits until it answers. False when it exits
    /// first: the port is taken (it exits when it cannot bind it, or its cluster bus port).
    async fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (make test installs it)");
        let pid = child.id();
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return false;
            }
            // the server answering may be another one that holds the port; ours has our pid
            if self.answers_as(pid).await {
                return true;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// True when the server on `self.port` is the process `pid`.
    async fn answers_as(&self, pid: u32) -> bool {
        let info = async {
            let mut c = redis::Client::open(self.url())?
                .get_multiplexed_async_connection()
                .await?;
            redis::cmd("INFO")
                .arg("server")
                .query_async::<String>(&mut c)
                .await
        };
        let ours = format!("process_id:{pid}");
        matches!(
            tokio::time::timeout(Duration::from_secs(1), info).await,
            Ok(Ok(info)) if info.lines().any(|l| l == ours)
        )
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port, empty (no persistence).
    pub async fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn().await,
            "port {} was taken while redis-server was down",
            self.port
        );
    }

    /// A plain client for the test's own commands (what a backend would run).
    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
