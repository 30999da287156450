//! `keyward dev --once` — the README's "run it" command — on this machine: a control
//! plane, the builtin provider, the controller, the quickstart keys Ready, and a
//! report that names data keys but never shows a value.

use std::process::Command;

#[test]
fn keyward_dev_once_brings_the_quickstart_to_ready() {
    keyward::control_plane::binaries().expect("control-plane binaries");
    let output = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(["dev", "--once"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("running keyward dev --once");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "keyward dev failed:\n{stdout}\n{stderr}"
    );

    let device = stdout
        .lines()
        .find(|l| l.starts_with("quickstart-device "))
        .expect(&stdout);
    assert!(
        device.contains(" True ") && device.contains(" builtin "),
        "{device}"
    );
    let agent = stdout
        .lines()
        .find(|l| l.starts_with("quickstart-agent "))
        .expect(&stdout);
    assert!(agent.contains(" True "), "{agent}");
    assert!(stdout.contains("Secret default/quickstart-device-key holds data keys: TS_AUTHKEY"));
    assert!(
        stdout.contains(
            "Secret default/quickstart-agent holds data keys: PREFECT_API_KEY, config.toml"
        )
    );
    assert!(stdout.contains("export KUBECONFIG="));
    // The dev provider prefixes every value with `kw_`; ids use `kw-`.
    assert!(
        !stdout.contains("kw_") && !stderr.contains("kw_"),
        "a key value was printed"
    );
    assert!(
        stderr.contains("waiting for the keys to be Ready"),
        "progress is shown"
    );
}
