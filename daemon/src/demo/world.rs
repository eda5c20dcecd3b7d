//! The lab around the daemon in `pcrd demo`: simulated extractors (Modbus TCP on
//! 127.0.0.1) and cyclers (each on a pseudo-terminal pair), and `pcrd serve` itself as
//! a child process that is started again whenever it dies, as a service manager would.
//! The instruments live in the demo's process, so they run on when the daemon is
//! killed, as real instruments do when the lab PC fails.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pcrd_drivers::sim::cycler::{CyclerSim, CyclerSimConfig, PlateScenario};
use pcrd_drivers::sim::extractor::{SimConfig, Simulator, TcpSim};
use pcrd_protocol::cycler::Command;
use pcrd_protocol::extractor::{ExtractorCommand, Profile};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command as Process};

/// The simulated extractor's register map, as shipped in `profiles/`.
const EXTRACTOR_PROFILE: &str = include_str!("../../../profiles/sim-extractor.toml");
/// Real-world lengths the accelerated times are derived from: a 96-well
/// magnetic-bead extraction takes about 30 minutes, a PCR cycle about 100 s.
const EXTRACTION_SECONDS: f64 = 1800.0;
const PCR_CYCLE_SECONDS: f64 = 100.0;

/// One simulated extractor.
#[derive(Debug)]
pub struct SimExtractor {
    pub name: String,
    pub sim: Simulator,
    server: TcpSim,
}

/// One simulated cycler and the pseudo-terminal it is plugged into.
#[derive(Debug)]
pub struct SimCycler {
    pub name: String,
    pub sim: CyclerSim,
    /// The daemon's end of the line.
    pub path: String,
    /// Held open so the line outlives the daemon: a pseudo-terminal whose last
    /// slave descriptor closes hangs up its master, and the daemon's is closed
    /// every time it is killed.
    _slave: tokio_serial::SerialStream,
}

/// The simulated instruments.
#[derive(Debug)]
pub struct Instruments {
    pub extractors: Vec<SimExtractor>,
    pub cyclers: Vec<SimCycler>,
    profile_path: PathBuf,
}

/// Times of the simulated instruments at a given acceleration.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub extraction: Duration,
    pub cycle: Duration,
    /// How often the daemon polls an extractor.
    pub poll: Duration,
}

impl Timing {
    pub fn at_speed(speed: f64) -> Timing {
        let seconds = |real: f64| Duration::from_secs_f64((real / speed).max(0.001));
        Timing {
            extraction: seconds(EXTRACTION_SECONDS).max(Duration::from_millis(50)),
            cycle: seconds(PCR_CYCLE_SECONDS),
            // Profiles allow 50 ms at the fastest (docs/modbus-profiles.md).
            poll: seconds(EXTRACTION_SECONDS / 20.0)
                .clamp(Duration::from_millis(50), Duration::from_millis(500)),
        }
    }
}

impl Instruments {
    /// Starts `extractors` extractors and `cyclers` cyclers; the extractors'
    /// profile is written into `dir` (the daemon's config names it).
    pub async fn start(
        extractors: usize,
        cyclers: usize,
        timing: Timing,
        dir: &Path,
    ) -> std::io::Result<Instruments> {
        // The daemon polls as often as the accelerated run needs; the rest of the
        // register map is the shipped one.
        let profile_text = EXTRACTOR_PROFILE.replace(
            "poll_interval_ms = 500",
            &format!("poll_interval_ms = {}", timing.poll.as_millis().max(1)),
        );
        let profile_path = dir.join("sim-extractor.toml");
        std::fs::write(&profile_path, &profile_text)?;
        let profile = Arc::new(
            Profile::from_toml_str(&profile_text)
                .map_err(|e| std::io::Error::other(format!("extractor profile: {e}")))?,
        );
        let mut out = Instruments {
            extractors: Vec::with_capacity(extractors),
            cyclers: Vec::with_capacity(cyclers),
            profile_path,
        };
        for i in 0..extractors {
            let sim = Simulator::new(
                Arc::clone(&profile),
                &[1],
                SimConfig {
                    run_time: timing.extraction,
                    ..SimConfig::default()
                },
            );
            let server = sim.serve_tcp().await?;
            out.extractors.push(SimExtractor {
                name: format!("ext-{}", i + 1),
                sim,
                server,
            });
        }
        for i in 0..cyclers {
            let sim = CyclerSim::new(CyclerSimConfig {
                cycle_time: timing.cycle,
                identity: format!("pcrd,SIM-96,SN{:04},0.1.0", i + 1),
                seed: i as u64 + 1,
            });
            let (master, slave) = tokio_serial::SerialStream::pair()
                .map_err(|e| std::io::Error::other(format!("pseudo-terminal: {e}")))?;
            let path = tokio_serial::SerialPort::name(&slave)
                .ok_or_else(|| std::io::Error::other("the pseudo-terminal has no name"))?;
            sim.serve(master);
            out.cyclers.push(SimCycler {
                name: format!("qpcr-{}", i + 1),
                sim,
                path,
                _slave: slave,
            });
        }
        Ok(out)
    }

    /// The `[[extractors]]` and `[[cyclers]]` entries for the daemon's config.
    pub fn config_toml(&self) -> String {
        let mut out = String::new();
        for e in &self.extractors {
            out.push_str(&format!(
                "\n[[extractors]]\nname = \"{}\"\nprofile = {:?}\ntcp = \"{}\"\ntimeout_ms = 500\n",
                e.name,
                self.profile_path.display().to_string(),
                e.server.addr
            ));
        }
        for c in &self.cyclers {
            out.push_str(&format!(
                "\n[[cyclers]]\nname = \"{}\"\nserial = {{ path = {:?}, baud = 115200 }}\ntimeout_ms = 2000\nsettle_ms = 100\nreconnect_max_ms = 200\n",
                c.name, c.path
            ));
        }
        out
    }

    /// Puts a plate into a cycler: what it will amplify when its run starts.
    pub fn load_cycler(&self, name: &str, curves: PlateScenario) -> bool {
        match self.cyclers.iter().find(|c| c.name == name) {
            Some(c) => {
                c.sim.set_scenario(curves);
                true
            }
            None => false,
        }
    }

    /// Start commands each instrument received, for the no-double-start check.
    pub fn starts(&self) -> Vec<(String, usize)> {
        let extractors = self.extractors.iter().map(|e| {
            let starts = e
                .sim
                .commands(1)
                .iter()
                .filter(|c| matches!(c, ExtractorCommand::Start { .. }))
                .count();
            (e.name.clone(), starts)
        });
        let cyclers = self.cyclers.iter().map(|c| {
            let starts = c
                .sim
                .commands()
                .iter()
                .filter(|c| matches!(c, Command::Start))
                .count();
            (c.name.clone(), starts)
        });
        extractors.chain(cyclers).collect()
    }
}

/// `pcrd serve` as a child process, restarted when it dies until stopped.
#[derive(Debug)]
pub struct DaemonProcess {
    pub url: String,
    pub pid_file: PathBuf,
    /// Starts after the first: the daemon died, or was killed before it listened.
    pub restarts: Arc<AtomicU32>,
    stopping: Arc<AtomicBool>,
    child: Arc<Mutex<Option<u32>>>,
    supervisor: tokio::task::JoinHandle<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot start pcrd serve: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("pcrd serve exited before listening ({0}); see {1}")]
    EarlyExit(String, String),
}

impl DaemonProcess {
    /// Starts `pcrd serve --config CONFIG` listening on `listen`, its log appended to
    /// `log`, its pid in `pid_file`; returns once it listens.
    pub async fn start(
        config: PathBuf,
        listen: std::net::SocketAddr,
        log: PathBuf,
        pid_file: PathBuf,
    ) -> Result<DaemonProcess, DaemonError> {
        let exe = std::env::current_exe().map_err(DaemonError::Spawn)?;
        let spawn = {
            let (config, log, pid_file) = (config.clone(), log.clone(), pid_file.clone());
            move || {
                let (exe, config, log, pid_file) =
                    (exe.clone(), config.clone(), log.clone(), pid_file.clone());
                async move { spawn_daemon(&exe, &config, listen, &log, &pid_file).await }
            }
        };
        let (child, pid, attempts) = spawn().await?;
        let current = Arc::new(Mutex::new(Some(pid)));
        let stopping = Arc::new(AtomicBool::new(false));
        // A daemon killed before it listened was started again within `spawn`.
        let restarts = Arc::new(AtomicU32::new(attempts - 1));
        let supervisor = tokio::spawn(supervise(
            child,
            spawn,
            Arc::clone(&stopping),
            Arc::clone(&restarts),
            Arc::clone(&current),
            log,
        ));
        Ok(DaemonProcess {
            url: format!("http://{listen}"),
            pid_file,
            restarts,
            stopping,
            child: current,
            supervisor,
        })
    }

    /// Stops the daemon with SIGTERM (it closes its store cleanly) and waits.
    pub async fn stop(self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(pid) = *self.child.lock().unwrap_or_else(|p| p.into_inner()) {
            terminate(pid);
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.supervisor).await;
        let _ = std::fs::remove_file(&self.pid_file);
    }

    /// The daemon's peak resident memory so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let pid = (*self.child.lock().unwrap_or_else(|p| p.into_inner()))?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

/// Sends SIGTERM through kill(1): std has no way to send a signal other than
/// SIGKILL, and the workspace forbids the unsafe call to libc. The pid is our own
/// unreaped child's (the supervisor reaps it), so it cannot have been reused.
fn terminate(pid: u32) {
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}

async fn spawn_daemon(
    exe: &Path,
    config: &Path,
    listen: std::net::SocketAddr,
    log: &Path,
    pid_file: &Path,
) -> Result<(Child, u32, u32), DaemonError> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(DaemonError::Spawn)?;
    // The port was free when the demo began; after a kill -9 it may linger briefly.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut child = Process::new(exe)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--listen")
            .arg(listen.to_string())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(std::process::Stdio::piped())
            .stderr(log_file.try_clone().map_err(DaemonError::Spawn)?)
            .kill_on_drop(true)
            .spawn()
            .map_err(DaemonError::Spawn)?;
        let pid = child.id().unwrap_or_default();
        let _ = std::fs::write(pid_file, format!("{pid}\n"));
        let Some(stdout) = child.stdout.take() else {
            return Err(DaemonError::EarlyExit(
                "no stdout".into(),
                log.display().to_string(),
            ));
        };
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        match lines.next_line().await {
            Ok(Some(line)) if line.starts_with("listening on ") => {
                // Keep reading so the child never blocks on a full pipe.
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                return Ok((child, pid, attempt));
            }
            _ => {
                let status = child.wait().await.map_err(DaemonError::Spawn)?;
                if attempt >= 20 {
                    return Err(DaemonError::EarlyExit(
                        status.to_string(),
                        log.display().to_string(),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

async fn supervise<F, Fut>(
    mut child: Child,
    spawn: F,
    stopping: Arc<AtomicBool>,
    restarts: Arc<AtomicU32>,
    current: Arc<Mutex<Option<u32>>>,
    log: PathBuf,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(Child, u32, u32), DaemonError>>,
{
    loop {
        let status = child.wait().await;
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        tracing::warn!(?status, log = %log.display(), "pcrd serve died; starting it again.");
        loop {
            match spawn().await {
                Ok((next, pid, attempts)) => {
                    *current.lock().unwrap_or_else(|p| p.into_inner()) = Some(pid);
                    restarts.fetch_add(attempts, Ordering::SeqCst);
                    child = next;
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %e, "pcrd serve does not start; trying again.");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}
