//! The docs page's demo in a real browser: two headless Chromium tabs
//! exchange a message through a real server with `los` and blocking reads.
//! Needs Debian's `chromium` and `npm install` in tests/browser (both done
//! by `.ci/run`).

mod common;
use common::*;
use std::process::Command;

#[test]
#[ignore = "needs chromium and node"]
fn two_tabs_meet_through_the_demo_page() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
    assert!(
        std::path::Path::new(&format!("{dir}/node_modules/playwright-core")).exists()
            && std::path::Path::new("/usr/bin/chromium").exists(),
        "needs chromium and playwright-core: run `bash .ci/run` (apt-get install chromium; npm install in tests/browser)"
    );
    let s = Server::start(&["-threads", "2"]);
    let out = Command::new("node")
        .arg("demo.mjs")
        .arg(format!("http://{}", s.addr))
        .current_dir(dir)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("\"received\":\"hello-from-tab-1\""), "{stdout}");
    assert!(stdout.contains("\"answered\":\"ack:hello-from-tab-1\""), "{stdout}");
}
