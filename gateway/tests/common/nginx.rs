//! A real nginx (Debian's package) in front of gateway processes, on a random port with a
//! private prefix: `/ws` is proxied to the upstreams with the WebSocket upgrade headers and
//! `X-Forwarded-For`, and `/id` tells this nginx from another server holding the port.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{http, on_random_port, T};

/// nginx in the foreground with a private prefix; killed on drop.
pub struct Nginx {
    child: Child,
    pub port: u16,
    _dir: PathBuf,
}

impl Nginx {
    /// nginx balancing `upstreams` (ports on 127.0.0.1) with `balance` (`""` for round
    /// robin, `"ip_hash;"` for sticky), on a random port; `name` keeps its files apart.
    pub async fn start(balance: &str, upstreams: &[u16], name: &str) -> Nginx {
        on_random_port(|port| Self::start_on(port, balance, upstreams, name)).await
    }

    /// The WebSocket URL through the balancer.
    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// nginx on `port`, or `None` when it cannot bind it.
    async fn start_on(port: u16, balance: &str, upstreams: &[u16], name: &str) -> Option<Nginx> {
        let dir = std::env::temp_dir().join(format!("gw-nginx-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let servers: String = upstreams
            .iter()
            .map(|p| format!("    server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;\n"))
            .collect();
        let d = dir.display();
        // what this nginx answers on /id, to tell it from another server holding the port
        let id = format!("{d}:{port}");
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n\
             fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n\
             upstream gateway {{\n    {balance}\n{servers}  }}\n\
             server {{\n    listen 127.0.0.1:{port};\n    location = /id {{ return 200 \"{id}\"; }}\n\
             location /ws {{\n\
             proxy_pass http://gateway;\n      proxy_http_version 1.1;\n\
             proxy_set_header Upgrade $http_upgrade;\n      proxy_set_header Connection \"upgrade\";\n\
             proxy_set_header Host $host;\n\
             proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
             proxy_connect_timeout 1s;\n      proxy_read_timeout 3600s;\n\
             proxy_next_upstream error timeout;\n    }}\n  }}\n}}\n"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let error_log = dir.join("error.log");
        let child = Command::new(nginx_binary())
            .arg("-e")
            .arg(&error_log)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx runs (make test installs it)");
        let mut nginx = Nginx {
            child,
            port,
            _dir: dir,
        };
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = tokio::time::Instant::now() + T;
        loop {
            // nginx logs a failed bind at once (then retries for seconds before it exits)
            let refused = std::fs::read_to_string(&error_log)
                .unwrap_or_default()
                .contains("bind() to");
            if refused || nginx.child.try_wait().unwrap().is_some() {
                return None;
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok()
                && matches!(
                    tokio::time::timeout(Duration::from_secs(1), http(addr, "GET", "/id", "", "")).await,
                    Ok((200, body)) if body == id
                )
            {
                return Some(nginx);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nginx did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx_binary() -> &'static str {
    if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    }
}
