//! [`Cli`], the flags and environment variables, generated from the settings table in
//! `mod.rs`, and [`Config::load`], which layers them over the file over the defaults.

// SocketAddr, LogFormat, Secret and SecretUrl are named by the settings table.
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use super::{ChannelOptions, Config, LogFormat, Secret, SecretUrl};
use crate::error::ConfigError;

/// Generates [`Cli`] and `layer` from the normalised table. Each setting's flag is
/// `--name-with-dashes` (clap's default for the field) and reads `GATEWAY_NAME`. The field
/// type and default are `config_struct!`'s business.
macro_rules! cli_struct {
    ($({ [$($doc:tt)*] [$($arg:tt)*]
         $name:ident: $ty:ty, $flag:ty = $default:expr, $layer:ident })*) => {
        /// Command-line flags; each also reads `GATEWAY_<FLAG>` from the environment.
        /// Unset flags leave the file's or the default value in place.
        #[derive(Debug, Default, Parser)]
        #[command(name = "gateway", version, about = "WebSocket gateway node")]
        pub struct Cli {
            /// TOML file with settings (keys as in docs/configuration.md).
            #[arg(long, env = "GATEWAY_CONFIG")]
            pub config: Option<PathBuf>,
            /// Validate the settings, print them (secrets redacted), and exit.
            #[arg(long)]
            pub check_config: bool,
            $(
                $($doc)*
                #[arg(long, env = env_name!($name))]
                $($arg)*
                pub $name: $flag,
            )*
        }

        /// Copies every setting given as a flag or environment variable onto `c`.
        fn layer(c: &mut Config, cli: Cli) {
            $( layer!($layer: cli.$name => c.$name); )*
        }
    };
}

/// How a flag lands on its setting: `value` and `option` flags are `Option`s that override
/// when given; a `switch` flag is a `bool` that can only switch its setting on.
macro_rules! layer {
    (value: $flag:expr => $field:expr) => {
        if let Some(v) = $flag {
            $field = v;
        }
    };
    (option: $flag:expr => $field:expr) => {
        if let Some(v) = $flag {
            $field = Some(v);
        }
    };
    (switch: $flag:expr => $field:expr) => {
        if $flag {
            $field = true;
        }
    };
}

/// `GATEWAY_<NAME>` for a setting, upper-cased at compile time: clap wants a `&'static str`
/// and the table names each setting only once.
macro_rules! env_name {
    ($name:ident) => {{
        const NAME: &str = stringify!($name);
        const BYTES: [u8; ENV_PREFIX.len() + NAME.len()] = env_bytes(NAME);
        const ENV: &str = match std::str::from_utf8(&BYTES) {
            Ok(env) => env,
            Err(_) => panic!("setting names are ASCII"),
        };
        ENV
    }};
}

const ENV_PREFIX: &str = "GATEWAY_";

/// `ENV_PREFIX` followed by `name` in upper case; `N` is the sum of their lengths.
const fn env_bytes<const N: usize>(name: &str) -> [u8; N] {
    let (prefix, name) = (ENV_PREFIX.as_bytes(), name.as_bytes());
    let mut out = [0; N];
    let mut i = 0;
    while i < N {
        out[i] = if i < prefix.len() {
            prefix[i]
        } else {
            name[i - prefix.len()].to_ascii_uppercase()
        };
        i += 1;
    }
    out
}

settings!(cli_struct);

impl Config {
    /// Builds the configuration from the command line, environment and optional file.
    pub fn load() -> Result<(Config, bool), ConfigError> {
        Self::from_cli(Cli::parse())
    }

    /// Layers `cli` (flags and env) over the file it names over the defaults. Returns the
    /// config and whether `--check-config` was given.
    pub fn from_cli(cli: Cli) -> Result<(Config, bool), ConfigError> {
        let mut c = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::Read(path.clone(), e))?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse(path.clone(), e))?
            }
            None => Config::default(),
        };
        let check_config = cli.check_config;
        layer(&mut c, cli);
        c.validate()?;
        Ok((c, check_config))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use clap::CommandFactory;

    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("gateway").chain(args.iter().copied()))
            .expect("flags parse")
    }

    #[test]
    fn refuses_to_start_without_auth() {
        let err = Config::from_cli(cli(&[])).unwrap_err();
        assert!(matches!(err, ConfigError::NoAuth), "{err}");
        assert!(err.to_string().contains("--allow-anonymous"));
    }

    #[test]
    fn flags_override_file_over_defaults() {
        let dir = std::env::temp_dir().join(format!("gw-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let file = dir.join("g.toml");
        std::fs::write(
            &file,
            "allow_anonymous = true\nmax_connections = 7\npublish_allow = [\"a:*\"]\n\
             tls_cert = \"file.crt\"\ntls_key = \"file.key\"\nrebalance = false\n",
        )
        .expect("write");
        let f = file.to_str().expect("utf8 path");
        let (c, check) = Config::from_cli(cli(&[
            "--config",
            f,
            "--max-connections",
            "9",
            "--tls-cert",
            "flag.crt",
        ]))
        .expect("valid config");
        assert!(!check);
        assert_eq!(c.max_connections, 9);
        assert_eq!(c.publish_allow, vec!["a:*"]);
        assert_eq!(c.max_message_bytes, Config::default().max_message_bytes);
        assert_eq!(c.tls_cert, Some("flag.crt".into()));
        assert_eq!(c.tls_key, Some("file.key".into()));
        assert!(c.allow_anonymous && !c.rebalance);

        std::fs::write(&file, "allow_anonymous = true\nmax_conections = 7\n").expect("write");
        let err = Config::from_cli(cli(&["--config", f])).unwrap_err();
        assert!(err.to_string().contains("max_conections"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let err =
            Config::from_cli(cli(&["--allow-anonymous", "--max-message-bytes", "10"])).unwrap_err();
        assert!(err.to_string().contains("max_message_bytes"), "{err}");
        let err = Config::from_cli(cli(&[
            "--allow-anonymous",
            "--ping-interval-ms",
            "100",
            "--ping-timeout-ms",
            "50",
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("ping_timeout_ms"), "{err}");
        // what `--check-config` says of public keys without an audience
        let err = Config::from_cli(cli(&["--jwt-public-key", "k.pem"])).unwrap_err();
        assert!(err.to_string().contains("jwt_audience"), "{err}");
        Config::from_cli(cli(&[
            "--jwt-public-key",
            "k.pem",
            "--jwt-allow-any-audience",
        ]))
        .expect("an explicit waiver");
    }

    /// Every setting has `--kebab-case` and `GATEWAY_UPPER_CASE`, and every flag other than
    /// `--config` and `--check-config` is a setting.
    #[test]
    fn every_setting_has_its_flag_and_env() {
        let cmd = Cli::command();
        let mut flags = BTreeSet::new();
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "config" | "check_config" | "help" | "version") {
                continue;
            }
            assert_eq!(arg.get_long(), Some(id.replace('_', "-").as_str()), "{id}");
            let env = arg.get_env().and_then(|e| e.to_str());
            assert_eq!(env, Some(format!("GATEWAY_{}", id.to_uppercase()).as_str()));
            flags.insert(id.to_owned());
        }
        let keys: BTreeSet<String> = Config::KEYS.iter().map(|k| k.to_string()).collect();
        assert_eq!(flags, keys);
    }

    /// One flag of each layering kind, and each secret, lands on its setting.
    #[test]
    fn each_kind_of_flag_reaches_the_config() {
        let (c, check) = Config::from_cli(cli(&[
            "--check-config",
            "--allow-anonymous",
            "--proxy-protocol",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--trusted-proxies",
            "10.0.0.0/8,192.168.0.1",
            "--allow-missing-origin=false",
            "--rebalance",
            "false",
            "--rebalance-slack",
            "0.5",
            "--log-format",
            "json",
            "--admin-token",
            "adm1n-t0ken",
            "--jwt-secret",
            "0123456789abcdef0123456789abcdef",
            "--redis-url",
            "redis://:url-pw@h:1",
            "--redis-password",
            "redis-pw",
        ]))
        .expect("valid config");
        assert!(check && c.allow_anonymous && c.proxy_protocol);
        assert_eq!(c.tls_cert, Some("c.pem".into()));
        assert_eq!(c.trusted_proxies, ["10.0.0.0/8", "192.168.0.1"]);
        assert!(!c.allow_missing_origin && !c.rebalance);
        assert_eq!(c.rebalance_slack, 0.5);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(
            c.admin_token.as_ref().map(Secret::expose),
            Some("adm1n-t0ken")
        );
        assert_eq!(
            c.redis_url.as_ref().map(SecretUrl::expose),
            Some("redis://:url-pw@h:1")
        );
        assert_eq!(
            c.redis_password.as_ref().map(Secret::expose),
            Some("redis-pw")
        );
        let shown = format!("{c:?}");
        for secret in ["adm1n-t0ken", "0123456789abcdef", "url-pw", "redis-pw"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }

    /// docs/configuration.md has a row for every setting, with its flag and variable, and no
    /// row for a setting that does not exist.
    #[test]
    fn every_setting_is_documented() {
        let doc = include_str!("../../../docs/configuration.md");
        for line in doc.lines().filter(|l| l.contains("` | `--")) {
            let key = line.split('`').nth(1).unwrap_or_default();
            assert!(
                Config::KEYS.contains(&key),
                "documented but not a setting: {line}"
            );
        }
        for key in Config::KEYS {
            let row = format!("| `{key}` | `--{}", key.replace('_', "-"));
            let row = doc
                .lines()
                .find(|l| l.starts_with(&row))
                .unwrap_or_else(|| panic!("docs/configuration.md has no row `{row}`"));
            let env = format!("`GATEWAY_{}", key.to_uppercase());
            assert!(row.contains(&env), "{key}: row lacks {env}");
        }
    }
}
