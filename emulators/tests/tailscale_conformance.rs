//! The Tailscale emulator against the official Go client, `tailscale.com/client/tailscale/v2`
//! at the version `emulators/conformance/tailscale/build` pins: the program beside that
//! script sends what the client sends (API token, OAuth client, federated identity;
//! create with every capability, get, list with and without `all`, delete, get after
//! delete, the refusals) and decodes every answer as the client does, so the emulator
//! cannot drift from the real client. The program is built from the Go module proxy
//! once per client version and cached (see the script).

mod common;

use std::{path::PathBuf, process::Command};

use common::Issuer;
use keyward_emulators::tailscale::Tailscale;

/// Builds (or finds) the conformance program; the script prints its path.
fn conformance_program() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/conformance/tailscale/build");
    let output = Command::new("bash")
        .arg(script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("running emulators/conformance/tailscale/build");
    assert!(
        output.status.success(),
        "building the conformance program failed ({}); see its output above",
        output.status
    );
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_official_go_client_agrees_with_the_emulator() {
    let program = tokio::task::spawn_blocking(conformance_program)
        .await
        .unwrap();
    let ts = Tailscale::start().await;
    let issuer = Issuer::start().await;
    let token = ts.add_api_token("ops@example.com");
    let subject = "system:serviceaccount:keyward-system:keyward";
    let audience = "api.tailscale.com/conformance";

    let run = tokio::process::Command::new(&program)
        .env("TS_BASE_URL", ts.base_url())
        .env("TS_API_TOKEN", &token)
        .env("TS_API_TOKEN_ID", ts.api_token_id(&token).unwrap())
        .env("TS_ISSUER", issuer.url())
        .env("TS_WIF_SUBJECT", subject)
        .env("TS_WIF_AUDIENCE", audience)
        .env("TS_WIF_JWT", issuer.token(subject, audience, 600))
        .env(
            "TS_WIF_JWT_WRONG_AUDIENCE",
            issuer.token(subject, "api.tailscale.com/other", 600),
        )
        .env(
            "TS_WIF_JWT_WRONG_SUBJECT",
            issuer.token("system:serviceaccount:other:keyward", audience, 600),
        )
        .kill_on_drop(true)
        .output()
        .await
        .expect("running the conformance program");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    println!("{stdout}");
    assert!(
        run.status.success(),
        "the official client disagrees with the emulator:\n{stderr}\n(last steps passed:\n{})",
        stdout.lines().rev().take(5).collect::<Vec<_>>().join("\n")
    );
    assert!(
        stdout.contains("conformance: every check passed"),
        "{stdout}"
    );
    let steps = stdout.lines().filter(|l| l.starts_with("ok: ")).count();
    assert!(steps >= 29, "{steps} checks ran:\n{stdout}");

    // What the client sent is what the emulator recorded: the exchange succeeded once
    // per client, and was refused for the audience and for the subject.
    assert!(ts.exchanges() >= 1);
    for why in ["audience", "subject"] {
        assert!(ts.exchange_refused(why), "{:?}", ts.exchange_refusals());
    }
    let first = &ts.create_bodies()[0];
    assert_eq!(
        first["capabilities"]["devices"]["create"],
        serde_json::json!({"reusable": true, "ephemeral": true, "preauthorized": true,
                           "tags": ["tag:edge", "tag:ci-2"]}),
        "the client sends every capability"
    );
}
