//! A throwaway PostgreSQL server for tests and benches: `initdb` in a temporary
//! directory, listening on 127.0.0.1 at a free port (its Unix socket inside the
//! directory), stopped and removed on drop.
//!
//! initdb and postgres refuse to run as root, and CI runs as root: then every server
//! binary runs as the `postgres` user (`runuser -u postgres --`) in a directory that
//! user owns. As any other user they run directly. The superuser is `postgres` either
//! way, with `trust` authentication (loopback only).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The install command named when the server binaries are missing.
pub const INSTALL_HINT: &str =
    "apt-get update && apt-get install -y postgresql-15 (scripts/test.sh does this)";

/// The directory holding `initdb`, `pg_ctl` and `psql`: `$PCRD_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<major>/bin`.
pub fn bin_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("PCRD_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let root = Path::new("/usr/lib/postgresql");
    let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .map_err(|e| format!("{}: {e}", root.display()))?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((major, bin))
        })
        .collect();
    majors.sort();
    majors
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| "no /usr/lib/postgresql/*/bin/initdb".to_owned())
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A running server; stopped (immediately) and its directory removed on drop.
#[derive(Debug)]
pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres_user: bool,
}

impl PgServer {
    /// initdb + start. Panics with the reason (and the install command when the
    /// binaries are missing): a test that needs PostgreSQL fails without it.
    pub fn start() -> PgServer {
        let bin = match bin_dir() {
            Ok(bin) => bin,
            Err(e) => {
                panic!("PostgreSQL server binaries are missing ({e}); install them: {INSTALL_HINT}")
            }
        };
        let as_postgres_user = running_as_root();
        let dir = tempfile::Builder::new()
            .prefix("pcrd-pg-")
            .tempdir()
            .expect("temporary directory for PostgreSQL");
        if as_postgres_user {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("run chown");
            assert!(
                status.success(),
                "chown postgres {} failed: is there a postgres user? ({INSTALL_HINT})",
                dir.path().display()
            );
        }
        let port = free_port();
        let server = PgServer {
            dir,
            bin,
            port,
            as_postgres_user,
        };
        let data = server.data_dir();
        server.run_ok(
            "initdb",
            &[
                "-D",
                &data.display().to_string(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        server.start_again();
        server
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory holding the Unix socket (a `host` for libpq-style clients).
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser.
    pub fn user(&self) -> &'static str {
        "postgres"
    }

    /// A key=value connection string for `dbname`.
    pub fn conninfo(&self, dbname: &str) -> String {
        format!(
            "host={} port={} user={} dbname={dbname}",
            self.host(),
            self.port,
            self.user()
        )
    }

    /// Starts the (stopped) server again on the same port and directory; waits until
    /// it accepts connections.
    pub fn start_again(&self) {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories={} -c fsync=on",
            self.port,
            self.dir.path().display()
        );
        let data = self.data_dir().display().to_string();
        let log = self.dir.path().join("server.log").display().to_string();
        self.run_ok(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-o", &options, "-w", "-t", "60", "start",
            ],
        );
        // pg_ctl -w waits for the server; make sure TCP answers too.
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect((self.host(), self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (fast shutdown: sessions are disconnected).
    pub fn stop(&self) {
        let data = self.data_dir().display().to_string();
        self.run_ok("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"]);
    }

    /// Runs SQL with psql as the superuser (over the Unix socket); returns stdout
    /// (unaligned, tuples only). Panics with psql's stderr on failure.
    pub fn psql(&self, dbname: &str, sql: &str) -> String {
        let socket = self.socket_dir().display().to_string();
        let port = self.port.to_string();
        let output = self.run(
            "psql",
            &[
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                &socket,
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                dbname,
                "-c",
                sql,
            ],
        );
        assert!(
            output.status.success(),
            "psql failed on {sql:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The server's log so far (errors with their statements; every statement after
    /// [`PgServer::log_statements`]).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Makes the server log every statement from now on (`log_statement = all`), so a
    /// test can read from [`PgServer::log`] which statements a client sent.
    pub fn log_statements(&self) {
        self.psql("postgres", "ALTER SYSTEM SET log_statement = 'all'");
        self.psql("postgres", "SELECT pg_reload_conf()");
        // The reload reaches running backends at their next command.
        std::thread::sleep(Duration::from_millis(200));
    }

    /// Creates an empty database and returns its name.
    pub fn create_database(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
        name.to_owned()
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        let path = self.bin.join(program);
        let mut command = if self.as_postgres_user {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        command.args(args).current_dir(self.dir.path());
        command
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e} ({INSTALL_HINT})", path.display()))
    }

    fn run_ok(&self, program: &str, args: &[&str]) {
        let output = self.run(program, args);
        if !output.status.success() {
            let log =
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
            panic!(
                "{program} {args:?} failed ({}):\n{}\n{}\nserver log:\n{log}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.data_dir().display().to_string();
        // Immediate: nothing in a throwaway server is worth a checkpoint.
        let _ = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}
