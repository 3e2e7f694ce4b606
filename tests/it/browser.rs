//! The browser tests (tests/browser/*.test.mjs): headless Chromium, driven by
//! playwright-core under Node's test runner, against this build of wsbeat. Node, the npm
//! packages and Chromium are installed by `tests/browser/ci-deps.sh` (CI runs it); a
//! missing one fails this test, it never skips.

use std::path::Path;
use std::process::Command;

#[ignore = "needs Node, its npm packages and Chromium: bash tests/browser/ci-deps.sh"]
#[test]
fn browser_tests_pass_in_headless_chromium() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        ["playwright-core", "ws", "typescript"]
            .iter()
            .all(|package| dir.join("node_modules").join(package).is_dir()),
        "tests/browser/node_modules is missing: run `bash tests/browser/ci-deps.sh`"
    );
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: run `bash tests/browser/ci-deps.sh`"
    );
    let out = Command::new("node")
        .args(["--test", "--test-concurrency=4", "--test-reporter=spec"])
        .current_dir(&dir)
        .env("WSBEAT_BIN", env!("CARGO_BIN_EXE_wsbeat"))
        .output()
        .expect("cannot run `node`: run `bash tests/browser/ci-deps.sh`");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "browser tests failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}
