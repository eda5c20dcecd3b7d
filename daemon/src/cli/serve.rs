//! `pcrd serve`: load the config, open the store, serve the API until SIGINT/SIGTERM.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use super::{ServeArgs, exit};
use crate::config::Config;
use crate::kits::KitRegistry;
use crate::lab::Lab;
use crate::store::Store;

/// Loads the config and kits, applying the command line's store override; on a
/// problem, prints every one and returns the exit code.
pub(super) fn load(
    config_path: &Path,
    data_dir: Option<PathBuf>,
) -> Result<(Config, KitRegistry), ExitCode> {
    let mut config = Config::load(config_path).map_err(|e| {
        eprintln!("pcrd: invalid configuration {}:", e.path.display());
        for problem in &e.problems {
            eprintln!("  - {problem}");
        }
        ExitCode::from(exit::USAGE)
    })?;
    if let Some(dir) = data_dir {
        config.store.path = dir;
    }
    let kits = KitRegistry::load(config.kits_dir.as_deref()).map_err(|problems| {
        eprintln!("pcrd: invalid kit definitions:");
        for problem in &problems {
            eprintln!("  - {problem}");
        }
        ExitCode::from(exit::USAGE)
    })?;
    // Watched folders name kits, which the config parser cannot check.
    let folder_problems = crate::folders::check_kits(&config.folders, &kits);
    if !folder_problems.is_empty() {
        eprintln!("pcrd: invalid configuration {}:", config_path.display());
        for problem in &folder_problems {
            eprintln!("  - {problem}");
        }
        return Err(ExitCode::from(exit::USAGE));
    }
    Ok((config, kits))
}

/// Opens the store and the lab on it; on failure, prints why and returns the exit code.
pub(super) fn open_lab(config: &Config, kits: KitRegistry) -> Result<Arc<Lab>, ExitCode> {
    let fail = |e: crate::store::StoreError| {
        tracing::error!(error = %e, "Cannot open the store.");
        eprintln!("pcrd: {e}");
        ExitCode::from(exit::STORE)
    };
    let store = Store::open(&config.store).map_err(fail)?;
    Lab::open(store, kits, config.lab_id.clone()).map_err(fail)
}

pub(super) fn run(args: ServeArgs) -> ExitCode {
    crate::telemetry::init(args.log_json);
    let (mut config, kits) = match load(&args.config, args.data_dir) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pcrd: cannot start the async runtime: {e}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    let started = std::time::Instant::now();
    let lab = match open_lab(&config, kits) {
        Ok(lab) => lab,
        Err(code) => return code,
    };
    let store = lab.store().clone();
    tracing::info!(
        path = %config.store.path.display(),
        tubes = lab.tube_count(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "Store opened."
    );
    let code = runtime.block_on(serve(config, Arc::clone(&lab)));
    // Requests have finished (graceful shutdown waits for them); what may still run is
    // a post-crash store check, which writes nothing and need not be waited for.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    if let Err(e) = store.close() {
        eprintln!("pcrd: closing the store: {e}");
        return ExitCode::from(exit::STORE);
    }
    code
}

async fn serve(config: Config, lab: Arc<Lab>) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("pcrd: cannot listen on {}: {e}", config.listen);
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("pcrd: {e}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    let shutdown = match shutdown_signal() {
        Ok(signal) => signal,
        Err(e) => {
            eprintln!("pcrd: cannot install signal handlers: {e}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    // One ASTM host per configured analyser; profiles are checked against the kits.
    let analysers =
        match crate::analysers::Analysers::start(&config.analysers, Arc::clone(&lab)).await {
            Ok(analysers) => Arc::new(analysers),
            Err(problems) => {
                eprintln!("pcrd: the analysers cannot start:");
                for problem in &problems {
                    eprintln!("  - {problem}");
                }
                return ExitCode::from(exit::USAGE);
            }
        };
    // The one line on stdout: scripts and tests read the address from it.
    println!("listening on http://{addr}");
    tracing::info!(%addr, lab = %config.lab_id, "pcrd is serving.");
    // One supervisor per configured extractor; with none configured, nothing starts.
    let instruments = crate::instruments::Instruments::start(&config.extractors);
    // One supervisor per configured cycler; runs that were in progress are resumed.
    let instruments = match crate::cyclers::Cyclers::start(&config.cyclers, Arc::clone(&lab)).await
    {
        Ok(cyclers) => instruments.with_cyclers(cyclers),
        Err(e) => {
            eprintln!("pcrd: cannot read the runs in the store: {e}");
            return ExitCode::from(exit::STORE);
        }
    };
    let instruments = Arc::new(instruments);
    // One delivery task per configured sink (issue 6); a receiver that is down is a
    // retry, not a failure to start.
    if let Err(e) = crate::outbox::worker::start(&lab, &config.sinks).await {
        eprintln!("pcrd: {e}");
        return ExitCode::from(exit::USAGE);
    }
    // Stores written before the review indexes existed are indexed once, before any
    // request reads them.
    match crate::review::index::ensure(&lab).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(candidates = n, "Result candidates indexed."),
        Err(e) => {
            eprintln!("pcrd: indexing the result candidates: {e}");
            return ExitCode::from(exit::STORE);
        }
    }
    // Review policy before the folders start staging results; the due-time watcher
    // counts tubes at risk for /metrics and warns when one becomes at risk (issue 7).
    lab.review().set_policy(config.review.clone());
    crate::review::due::spawn_watcher(Arc::clone(&lab));
    // One polling task per watched export folder (issue 8).
    let folders = crate::folders::Folders::start(Arc::clone(&lab), &config.folders);
    // The gateway's lamp, buzzer and button (issue 7); with no [panel], nothing starts.
    let panel = match crate::panel::Panel::start(
        config.panel.as_ref(),
        Arc::clone(&lab),
        Arc::clone(&instruments),
    ) {
        Ok(panel) => Arc::new(panel),
        Err(e) => {
            eprintln!("pcrd: {e}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    let app = crate::api::router(
        Arc::clone(&lab),
        Arc::clone(&instruments),
        folders,
        analysers,
        panel,
        config.users,
        config.max_body_bytes,
    );
    if lab.store().clean_start() {
        tracing::info!("The store was closed cleanly; skipping the full check.");
    } else {
        tracing::warn!("The store was not closed cleanly; reading every record to check it.");
        tokio::spawn(scrub_in_background(Arc::clone(&lab)));
    }
    // A store that can no longer make writes durable (a failed barrier, or damage found
    // by the scrub) stops the daemon: an operator must act, and a restart re-checks it.
    let store = lab.store().clone();
    let stop = async move {
        tokio::select! {
            () = shutdown => {}
            why = store.failed() => {
                tracing::error!(error = %why, "The store failed; pcrd stops.");
            }
        }
    };
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await;
    if let Some(why) = lab.store().failure() {
        eprintln!("pcrd: {why}");
        return ExitCode::from(exit::STORE);
    }
    match result {
        Ok(()) => {
            tracing::info!("pcrd stopped.");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pcrd: server error: {e}");
            ExitCode::from(exit::UNAVAILABLE)
        }
    }
}

/// Reads the whole store once after a start that followed a crash. sled checks a
/// page's checksum only when the page is read, so damage would otherwise surface on
/// some later request. Done in the background so that a large store does not delay the
/// lab's start (a million tubes take seconds, and sled keeps much of what it read in
/// memory, which is why a clean start skips it); on damage the store stops
/// acknowledging writes at once and the daemon stops with the store's exit code.
async fn scrub_in_background(lab: Arc<Lab>) {
    let started = std::time::Instant::now();
    let checked = Arc::clone(&lab);
    match tokio::task::spawn_blocking(move || checked.scrub()).await {
        Ok(Ok(report)) => tracing::info!(
            tubes = report.tubes,
            plates = report.plates,
            audit_entries = report.audit_entries,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "Store check passed."
        ),
        Ok(Err(e)) => lab.store().fail(e.to_string()),
        Err(e) => tracing::error!(error = %e, "The store check could not run."),
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not
/// when the future is first polled, so a signal that arrives right after start-up is
/// not lost (the default action would kill the daemon without closing the store).
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {},
            _ = interrupt.recv() => {},
        }
    })
}
