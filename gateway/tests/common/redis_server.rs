//! A real `redis-server` per test, on a free port, that a test can kill and restart. Never
//! the machine's shared server on 6379.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A private Redis. Killed on drop.
pub struct RedisServer {
    pub port: u16,
    extra: Vec<String>,
    child: Option<Child>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        Self::start_with(free_port(), &[]).await
    }

    /// Starts on `port` with extra `redis-server` arguments.
    pub async fn start_with(port: u16, extra: &[&str]) -> RedisServer {
        let mut s = RedisServer {
            port,
            extra: extra.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        s.spawn().await;
        s
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (make test installs it)");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if self.ping().await {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn ping(&self) -> bool {
        match tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await {
            Ok(mut s) => {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let _ = s.write_all(b"PING\r\n").await;
                let mut buf = [0u8; 7];
                matches!(
                    tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf)).await,
                    Ok(Ok(_)) if &buf == b"+PONG\r\n"
                )
            }
            Err(_) => false,
        }
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
        self.spawn().await;
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
