//! The control plane's processes: `keyward local-cluster` (what `hack/local-cluster up`
//! runs) starts every server, and nothing outlives it — killing it with SIGKILL, the way
//! a crashed or aborted test binary dies, still stops them all and, for a temporary
//! folder, removes their data. A port taken between its pick and the server's bind is
//! replaced by a fresh one (a bounded number of times), and the API server restarts in
//! place under a running client.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::TcpListener,
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use keyward::control_plane::{ControlPlane, Error, Options, free_port};
use kube::{
    Api, ResourceExt,
    api::PostParams,
    runtime::{WatchStreamExt, watcher},
};

fn alive(pid: &str) -> bool {
    // A zombie has exited; only its parent's bookkeeping is left.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.contains(") Z "))
        .unwrap_or(false)
}

/// The program a process runs (the file name of its argv[0]).
fn program(pid: &str) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    let argv0 = String::from_utf8_lossy(argv0).into_owned();
    Path::new(&argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn killing_the_owner_stops_the_servers() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("cluster");
    // Make sure the binaries exist before timing the start-up.
    keyward::control_plane::binaries().expect("control-plane binaries");
    let mut owner = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(["local-cluster", "--dir"])
        .arg(&state)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        "the control plane to be ready",
        Duration::from_secs(180),
        || state.join("ready").exists(),
    );
    let kubeconfig = std::fs::read_to_string(state.join("ready")).unwrap();
    assert!(Path::new(&kubeconfig).exists());
    let pids = std::fs::read_to_string(state.join("pids")).unwrap();
    let pids: Vec<&str> = pids.split_whitespace().collect();
    let programs: BTreeSet<String> = pids.iter().map(|p| program(p)).collect();
    assert_eq!(
        programs,
        BTreeSet::from(
            [
                "etcd",
                "kube-apiserver",
                "kube-controller-manager",
                "kube-scheduler",
                "kwok"
            ]
            .map(String::from)
        ),
        "every server runs while its owner does"
    );

    owner.kill().unwrap(); // SIGKILL: no destructor runs, only the watchdog can clean up
    owner.wait().unwrap();
    wait_for("every server to stop", Duration::from_secs(30), || {
        pids.iter().all(|p| !alive(p))
    });
}

#[test]
fn a_second_call_reuses_the_binaries() {
    let first = keyward::control_plane::binaries().expect("control-plane binaries");
    let built = std::fs::metadata(first.join("kube-apiserver"))
        .unwrap()
        .modified()
        .unwrap();
    let started = Instant::now();
    let second = keyward::control_plane::binaries().unwrap();
    assert_eq!(first, second);
    let again = std::fs::metadata(second.join("kube-apiserver"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(built, again, "nothing was rebuilt");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a cache hit is immediate"
    );
    for bin in [
        "kube-apiserver",
        "etcd",
        "kube-controller-manager",
        "kube-scheduler",
        "kwok",
        "kwok-stages.yaml",
    ] {
        assert!(second.join(bin).exists(), "{bin} in {}", second.display());
    }
}

/// Hands every server a port someone already listens on, `taken_picks` times per
/// server, then free ones; counts the picks.
fn taking_picker(taken: u16, taken_picks: usize) -> (Options, Arc<Mutex<BTreeMap<String, usize>>>) {
    let picks = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let counted = picks.clone();
    let options = Options {
        workloads: true,
        ports: Some(Arc::new(move |server: &str| {
            let mut picks = counted.lock().unwrap();
            let n = picks.entry(server.to_owned()).or_default();
            *n += 1;
            if *n <= taken_picks {
                taken
            } else {
                free_port()
            }
        })),
        ..Options::default()
    };
    (options, picks)
}

#[tokio::test]
async fn a_port_taken_before_its_server_binds_it_is_replaced_by_a_fresh_one() {
    let occupant = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = occupant.local_addr().unwrap().port();
    let (options, picks) = taking_picker(taken, 1);

    let plane = ControlPlane::start(options)
        .await
        .expect("start-up recovers from taken ports");
    assert!(!plane.server().ends_with(&format!(":{taken}")));
    let picks = picks.lock().unwrap().clone();
    for server in [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
    ] {
        assert!(
            picks.get(server).copied().unwrap_or_default() >= 2,
            "{server} got the taken port first and then a fresh one: {picks:?}"
        );
    }
    let client = plane.client().await.unwrap();
    let names: Vec<&str> = plane.pids().iter().map(|(name, _)| *name).collect();
    assert_eq!(
        names,
        [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kwok"
        ],
        "one of each runs; the ones that lost their port are gone"
    );
    client
        .apiserver_version()
        .await
        .expect("the API server answers");
}

#[tokio::test]
async fn a_port_that_stays_taken_fails_start_up_after_a_bounded_number_of_attempts() {
    let occupant = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = occupant.local_addr().unwrap().port();
    let (options, _) = taking_picker(taken, usize::MAX);

    let started = Instant::now();
    match ControlPlane::start(options).await {
        Err(Error::PortsTaken { attempts, .. }) => assert_eq!(attempts, 5),
        Err(other) => panic!("expected PortsTaken, got {other}"),
        Ok(_) => panic!("started on a taken port"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "gives up, does not hang"
    );
}

#[tokio::test]
async fn a_client_keeps_working_across_an_api_server_restart() {
    let plane = ControlPlane::start(Options {
        workloads: true,
        ..Options::default()
    })
    .await
    .unwrap();
    let client = plane.client().await.unwrap();
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let map = |name: &str| {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap()
    };
    maps.create(&PostParams::default(), &map("before"))
        .await
        .unwrap();

    // A watch that lives across the restart, as keyward's controllers' do.
    let (seen, mut names) = tokio::sync::mpsc::unbounded_channel();
    let watch = tokio::spawn(
        watcher(maps.clone(), watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .for_each(move |m| {
                if let Ok(m) = m {
                    let _ = seen.send(m.name_any());
                }
                async {}
            }),
    );
    let next = async |names: &mut tokio::sync::mpsc::UnboundedReceiver<String>, want: &str| {
        tokio::time::timeout(Duration::from_secs(60), async {
            while names.recv().await.as_deref() != Some(want) {}
        })
        .await
        .unwrap_or_else(|_| panic!("the watch to see {want}"))
    };
    next(&mut names, "before").await;

    let before = plane.pids();
    plane
        .restart_apiserver()
        .await
        .expect("the API server restarts");
    let after = plane.pids();
    let apiserver =
        |pids: &[(&str, u32)]| pids.iter().find(|(n, _)| *n == "kube-apiserver").unwrap().1;
    assert_ne!(
        apiserver(&after),
        apiserver(&before),
        "a new kube-apiserver process"
    );
    assert!(
        !alive(&apiserver(&before).to_string()),
        "the old one is gone"
    );
    let others = |pids: &[(&'static str, u32)]| -> Vec<(&'static str, u32)> {
        pids.iter()
            .copied()
            .filter(|(n, _)| *n != "kube-apiserver")
            .collect()
    };
    assert_eq!(
        others(&after),
        others(&before),
        "the other servers ride it out"
    );
    assert!(after.iter().all(|(_, p)| alive(&p.to_string())));

    assert!(
        maps.get_opt("before").await.unwrap().is_some(),
        "objects persist and the same client reads them"
    );
    maps.create(&PostParams::default(), &map("after"))
        .await
        .unwrap();
    next(&mut names, "after").await;
    watch.abort();
}
