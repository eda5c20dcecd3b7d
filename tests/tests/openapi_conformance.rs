//! The API against its own OpenAPI document, checked by an independent tool:
//! schemathesis (PyPI) generates requests from the document, valid and invalid, sends
//! them to a real daemon and checks every answer: no 5xx, only documented status codes,
//! JSON where JSON is promised, bodies that match their schemas, invalid requests
//! refused. `scripts/test.sh` installs it into `.peers/python`.
//!
//! Excluded check: `positive_data_acceptance`, which expects every schema-valid request
//! to succeed; a schema cannot express "this plate exists" or "this tube was already
//! received", so lab rules rightly refuse some of them.

use std::process::Command;

use pcrd_tests::{ADMIN_TOKEN, Daemon, peers_dir};

#[test]
fn the_api_conforms_to_its_openapi_document_under_generated_requests() {
    let python = peers_dir().join("python");
    let st = python.join("bin/st");
    assert!(
        st.exists(),
        "schemathesis is not installed at {}: run scripts/test.sh (it installs the test peers)",
        st.display()
    );
    let daemon = Daemon::start();
    // schemathesis keeps a cache in its working directory; keep it out of the repo.
    let scratch = tempfile::tempdir().expect("temp dir");
    let output = Command::new(&st)
        .current_dir(scratch.path())
        .env("PYTHONPATH", &python)
        .args([
            "run",
            &format!("{}/api/v1/openapi.json", daemon.url),
            "--url",
            &daemon.url,
            "-H",
            &format!("Authorization: Bearer {ADMIN_TOKEN}"),
            "--max-examples",
            "40",
            "--seed",
            "20261127",
            "--exclude-checks",
            "positive_data_acceptance",
            "--no-color",
        ])
        .output()
        .expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{stdout}\n{stderr}"
    );
    // A run that tested nothing would also exit 0.
    assert!(
        stdout.contains("passed") && !stdout.contains(" 0 generated"),
        "schemathesis did not test anything:\n{stdout}"
    );
    // And the daemon never answered a server error (also a schemathesis check, but
    // the daemon's own log is the independent witness).
    assert!(
        !daemon.stderr().contains("Store failure"),
        "{}",
        daemon.stderr()
    );
}
