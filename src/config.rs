//! The optional user config file (TOML), for defaults the command line would repeat:
//!
//! ```toml
//! server = "sotto://host:7070#sha256:…"   # default for register / login --server
//! listen = "0.0.0.0:7777"                  # default for up --listen
//! notify = "bell"                          # on incoming messages: "off", "bell", "desktop"
//! ```
//!
//! Unknown keys are an error, so a typo never silently does nothing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::address::ServerAddress;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
}

/// How to tell the user about an incoming message while `up` or `chat` runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Notify {
    #[default]
    Off,
    /// The terminal bell.
    Bell,
    /// A desktop notification (via `notify-send`) naming the sender, never the text.
    Desktop,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: Option<String>,
    pub listen: Option<SocketAddr>,
    #[serde(default)]
    pub notify: Notify,
}

impl Config {
    /// Reads `path`; a missing file is the empty config.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(source) => return Err(ConfigError::Read { path: path.to_path_buf(), source }),
        };
        Self::parse(&text).map_err(|message| ConfigError::Parse { path: path.to_path_buf(), message })
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        if let Some(server) = &config.server {
            server.parse::<ServerAddress>().map_err(|e| format!("server: {e}"))?;
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key() {
        let pin = "ab".repeat(32);
        let c =
            Config::parse(&format!("server = \"sotto://h:1#sha256:{pin}\"\nlisten = \"0.0.0.0:7777\"\nnotify = \"desktop\"\n")).unwrap();
        assert_eq!(c.listen, Some("0.0.0.0:7777".parse().unwrap()));
        assert_eq!(c.notify, Notify::Desktop);
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn mistakes_are_errors() {
        assert!(Config::parse("sever = \"x\"").unwrap_err().contains("sever"), "unknown keys are refused");
        assert!(Config::parse("notify = \"loud\"").is_err());
        assert!(Config::parse("server = \"http://x\"").unwrap_err().contains("server"));
        assert!(Config::parse("listen = \"nowhere\"").is_err());
    }

    #[test]
    fn a_missing_file_is_empty() {
        assert_eq!(Config::load(Path::new("/nonexistent/sotto/config.toml")).unwrap(), Config::default());
    }
}
