//! `[[analysers]]` in the config file: one ASTM host per analyser.
//!
//! ```toml
//! [[analysers]]
//! name = "an-1"
//! profile = "analysers/sim-an01.toml"      # mapping profile, relative to the config
//! tcp = { listen = "0.0.0.0:5001", peers = ["192.168.1.60"] }
//! # or: serial = { path = "/dev/ttyUSB0", baud = 9600 }
//! accepts_orders = true                     # worklists may be sent to it
//! text_per_frame = 240                      # 240 for E1381-95 peers, larger for LIS1-A
//! reply_timeout_ms = 15000                  # the standard's timers
//! receive_timeout_ms = 30000
//! max_message_bytes = 4194304
//! ```

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pcrd_protocol::astm::frame;
use pcrd_protocol::astm::link::LinkConfig;
use pcrd_protocol::astm::mapping::MappingProfile;
use serde::Deserialize;

/// `[[analysers]]` as written (unknown keys are collected by the config loader).
#[derive(Debug, Deserialize)]
pub struct RawAnalyser {
    name: String,
    profile: PathBuf,
    tcp: Option<RawTcp>,
    serial: Option<RawSerial>,
    accepts_orders: Option<bool>,
    text_per_frame: Option<usize>,
    reply_timeout_ms: Option<u64>,
    receive_timeout_ms: Option<u64>,
    max_message_bytes: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct RawTcp {
    listen: String,
    peers: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct RawSerial {
    path: String,
    baud: u32,
    exclusive: Option<bool>,
}

/// One analyser, validated.
#[derive(Clone, Debug)]
pub struct AnalyserConfig {
    pub name: String,
    pub profile_path: PathBuf,
    pub profile: Arc<MappingProfile>,
    pub transport: Transport,
    /// Worklists (O records) may be sent to it.
    pub accepts_orders: bool,
    /// Timers, frame size and message limit for the link.
    pub link: LinkConfig,
}

/// Where the analyser is.
#[derive(Clone, Debug)]
pub enum Transport {
    /// pcrd listens; only these peer addresses are served.
    Tcp {
        listen: SocketAddr,
        peers: Vec<IpAddr>,
    },
    /// One serial port, 8N1.
    Serial {
        path: String,
        baud: u32,
        /// Lock the port (TIOCEXCL); tests on a pty turn it off.
        exclusive: bool,
    },
}

impl Transport {
    /// For the API: `tcp LISTEN` or `serial PATH @ BAUD`.
    pub fn describe(&self) -> String {
        match self {
            Transport::Tcp { listen, .. } => format!("tcp {listen}"),
            Transport::Serial { path, baud, .. } => format!("serial {path} @ {baud}"),
        }
    }
}

/// Baud rates of analyser serial lines (E1381 allows 1200..=19200 and LIS1-A more).
const SERIAL_BAUDS: std::ops::RangeInclusive<u32> = 1200..=115_200;

/// Validates `[[analysers]]` and loads each mapping profile (relative to `base`).
/// Kits are checked later, against the kit registry ([`super::Analysers::start`]).
pub fn parse_analysers(
    raw: Vec<RawAnalyser>,
    base: &Path,
    problems: &mut Vec<String>,
) -> Vec<AnalyserConfig> {
    let mut names = BTreeSet::new();
    let mut out = Vec::new();
    for (i, a) in raw.into_iter().enumerate() {
        let at = format!("analysers[{i}] ({:?})", a.name);
        let before = problems.len();
        if a.name.trim().is_empty() {
            problems.push(format!("analysers[{i}].name must not be empty"));
        }
        if !names.insert(a.name.clone()) {
            problems.push(format!("{at}: analyser name appears twice"));
        }
        let transport = match (a.tcp, a.serial) {
            (Some(tcp), None) => {
                let listen = tcp.listen.parse::<SocketAddr>().map_err(|e| {
                    format!(
                        "{at}: tcp.listen {:?} is not an address like 0.0.0.0:5001: {e}",
                        tcp.listen
                    )
                });
                let mut peers = Vec::new();
                for p in &tcp.peers {
                    match p.parse::<IpAddr>() {
                        Ok(ip) => peers.push(ip),
                        Err(e) => problems.push(format!(
                            "{at}: tcp.peers {p:?} is not an IP address like 192.168.1.60: {e}"
                        )),
                    }
                }
                if tcp.peers.is_empty() {
                    problems.push(format!(
                        "{at}: tcp.peers is empty: list the analyser's IP address (others are refused)"
                    ));
                }
                match listen {
                    Ok(listen) => Some(Transport::Tcp { listen, peers }),
                    Err(e) => {
                        problems.push(e);
                        None
                    }
                }
            }
            (None, Some(serial)) => {
                crate::config::check_serial_line(
                    &at,
                    Some(&serial.path),
                    serial.baud,
                    &SERIAL_BAUDS,
                    problems,
                );
                Some(Transport::Serial {
                    path: serial.path,
                    baud: serial.baud,
                    exclusive: serial.exclusive.unwrap_or(true),
                })
            }
            (Some(_), Some(_)) => {
                problems.push(format!("{at}: give tcp or serial, not both"));
                None
            }
            (None, None) => {
                problems.push(format!(
                    "{at}: needs tcp = {{ listen = \"HOST:PORT\", peers = [\"IP\"] }} or a serial table"
                ));
                None
            }
        };
        let mut link = LinkConfig::computer();
        let max_text = frame::MAX_FRAME_LEN - frame::FRAME_OVERHEAD;
        if let Some(n) = a.text_per_frame {
            if !(16..=max_text).contains(&n) {
                problems.push(format!(
                    "{at}: text_per_frame {n} is outside 16..={max_text}"
                ));
            }
            link.text_per_frame = n;
        }
        for (key, value, slot) in [
            (
                "reply_timeout_ms",
                a.reply_timeout_ms,
                &mut link.reply_timeout,
            ),
            (
                "receive_timeout_ms",
                a.receive_timeout_ms,
                &mut link.receive_timeout,
            ),
        ] {
            if let Some(ms) = value {
                if !(100..=600_000).contains(&ms) {
                    problems.push(format!("{at}: {key} {ms} is outside 100..=600000"));
                }
                *slot = Duration::from_millis(ms);
            }
        }
        if let Some(n) = a.max_message_bytes {
            if !(1024..=64 * 1024 * 1024).contains(&n) {
                problems.push(format!(
                    "{at}: max_message_bytes {n} is outside 1024..=67108864"
                ));
            }
            link.max_message_len = n;
        }
        let profile_path = base.join(&a.profile);
        let profile = match std::fs::read_to_string(&profile_path) {
            Ok(text) => match MappingProfile::from_toml_str(&text) {
                Ok(p) => Some(Arc::new(p)),
                Err(e) => {
                    problems.push(format!(
                        "{at}: mapping profile {}: {e}",
                        profile_path.display()
                    ));
                    None
                }
            },
            Err(e) => {
                problems.push(format!(
                    "{at}: mapping profile {}: {e}",
                    profile_path.display()
                ));
                None
            }
        };
        if problems.len() != before {
            continue;
        }
        if let (Some(transport), Some(profile)) = (transport, profile) {
            out.push(AnalyserConfig {
                name: a.name,
                profile_path,
                profile,
                transport,
                accepts_orders: a.accepts_orders.unwrap_or(false),
                link,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use crate::config::Config;
    use std::path::Path;

    const BASE: &str = "[lab]\nid = \"LAB-01\"\n[[users]]\nname = \"alice\"\nrole = \"technician\"\ntoken = \"alice-token-0123456789\"\n";

    fn parse(extra: &str) -> Result<Config, Vec<String>> {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        Config::parse(&format!("{BASE}{extra}"), &repo, |_| None)
    }

    #[test]
    fn analysers_are_read_with_their_profiles() {
        let config = parse(
            "[[analysers]]\nname = \"an-1\"\nprofile = \"analysers/sim-an01.toml\"\ntcp = { listen = \"0.0.0.0:5001\", peers = [\"192.168.1.60\"] }\naccepts_orders = true\ntext_per_frame = 1000\nreceive_timeout_ms = 5000\n\n[[analysers]]\nname = \"an-2\"\nprofile = \"analysers/sim-an01.toml\"\nserial = { path = \"/dev/ttyUSB0\", baud = 9600 }\n",
        )
        .unwrap();
        assert_eq!(config.analysers.len(), 2);
        let a = &config.analysers[0];
        assert_eq!(a.profile.key(), "SIM-AN01@1");
        assert!(a.accepts_orders);
        assert_eq!(a.link.text_per_frame, 1000);
        assert_eq!(a.link.receive_timeout.as_millis(), 5000);
        assert_eq!(a.transport.describe(), "tcp 0.0.0.0:5001");
        assert_eq!(
            config.analysers[1].transport.describe(),
            "serial /dev/ttyUSB0 @ 9600"
        );
    }

    #[test]
    fn every_problem_is_named() {
        let problems = parse(
            "[[analysers]]\nname = \"an-1\"\nprofile = \"analysers/missing.toml\"\ntcp = { listen = \"nowhere\", peers = [\"host-a\"] }\ntext_per_frame = 5\nbogus = 1\n\n[[analysers]]\nname = \"an-1\"\nprofile = \"analysers/sim-an01.toml\"\n",
        )
        .unwrap_err();
        let all = problems.join("\n");
        for needle in [
            "unknown key `analysers.0.bogus`",
            "tcp.listen \"nowhere\" is not an address",
            "tcp.peers \"host-a\" is not an IP address",
            "text_per_frame 5 is outside",
            "analysers/missing.toml",
            "analyser name appears twice",
            "needs tcp",
        ] {
            assert!(all.contains(needle), "{needle:?} not in:\n{all}");
        }
    }
}
