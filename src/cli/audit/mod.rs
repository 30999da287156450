//! `audit PROVIDER`: the sweeper. Lists the upstream keys a provider's credential can
//! see that carry a keyward marker, ties each to its resource ([`tie`]), reports
//! whether the resource still holds it, and with `--revoke` revokes the orphans.
//!
//! It builds the provider as the operator does ([`crate::resolve::build_provider`]:
//! the provider resource and its credential Secret, read with the caller's
//! kubeconfig), so it is the one verb that needs to read a Secret. The upstream is
//! listed before the resources are read, and the resources are read again just
//! before revoking: a key issued meanwhile is held or has its attempt recorded by
//! then, so it is never taken for an orphan.

pub mod tie;

use std::{io::IsTerminal, sync::Arc};

use kube::{Api, Client};
use serde::Serialize;

use super::{
    Connection, Error, Operator,
    keys::{self, Key, ProviderName},
    output::{Style, Table, Tone, document, relative},
};
use crate::{
    context::{self, Context, NoFaults, Settings},
    providers::{self, DefaultFactory, KeyApi, ServiceAccount},
    resolve,
    resources::{ClusterKeyProvider, KeyProvider, KeyProviderSpec, ProviderKind},
};
use tie::{Scope, State, Tie};

/// `audit PROVIDER [--revoke [--yes]]`.
#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    /// The provider whose credential lists the keys: `NAME` or `kp/NAME` (a
    /// KeyProvider in the namespace of -n), `kp/NAMESPACE/NAME`, or `ckp/NAME` (a
    /// ClusterKeyProvider).
    pub provider: String,
    /// Revoke the orphans, after asking.
    #[arg(long)]
    pub revoke: bool,
    /// With --revoke: do not ask (needed when stdin is not a terminal).
    #[arg(short = 'y', long, requires = "revoke")]
    pub yes: bool,
    #[command(flatten)]
    pub operator: Operator,
    /// The ServiceAccount keyward runs as (`NAME` in the operator namespace, or
    /// `NAMESPACE/NAME`), for a Tailscale provider with `workloadIdentity`: audit asks
    /// the API server for its tokens, which takes `create` on `serviceaccounts/token`.
    #[arg(long, value_name = "[NAMESPACE/]NAME")]
    pub service_account: Option<String>,
    #[command(flatten)]
    pub connection: Connection,
}

/// A listed key, and what `--revoke` did about it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Audited {
    #[serde(flatten)]
    pub tie: Tie,
    pub revoked: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoke_error: Option<String>,
}

/// The `-o json|yaml` document.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Report<'a> {
    provider: String,
    /// `all namespaces`, or the one namespace whose keys could be read.
    keys_read_in: String,
    keys: &'a [Audited],
    orphans: usize,
    revoked: usize,
}

/// `NAME`, `kp/NAME`, `kp/NAMESPACE/NAME` or `ckp/NAME` (kubectl's long spellings
/// too); `namespace` is that of -n or the context.
pub fn parse_provider(word: &str, namespace: &str) -> Result<ProviderName, Error> {
    let bad = |why: &str| {
        Error::Usage(format!(
            "{word}: {why}; name a provider as NAME or kp/NAME (a KeyProvider in the namespace of -n), kp/NAMESPACE/NAME, or ckp/NAME (a ClusterKeyProvider)"
        ))
    };
    let parts: Vec<&str> = word.split('/').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(bad("an empty name"));
    }
    let kind = |word: &str| {
        let word = word.to_ascii_lowercase();
        match word.strip_suffix(".keyward.dev").unwrap_or(&word) {
            "kp" | "keyprovider" | "keyproviders" => Some(ProviderKind::KeyProvider),
            "ckp" | "clusterkeyprovider" | "clusterkeyproviders" => {
                Some(ProviderKind::ClusterKeyProvider)
            }
            _ => None,
        }
    };
    let (kind, namespace, name) = match parts[..] {
        [name] => (ProviderKind::KeyProvider, Some(namespace), name),
        [k, name] => {
            let kind = kind(k).ok_or_else(|| bad(&format!("{k} is not a provider kind")))?;
            let namespace = (kind == ProviderKind::KeyProvider).then_some(namespace);
            (kind, namespace, name)
        }
        [k, ns, name] if kind(k) == Some(ProviderKind::KeyProvider) => {
            (ProviderKind::KeyProvider, Some(ns), name)
        }
        _ => return Err(bad("not a provider name")),
    };
    Ok(ProviderName {
        kind,
        namespace: namespace.map(str::to_owned),
        name: name.to_owned(),
    })
}

/// The provider's spec and the namespace of its credential Secret.
async fn read_provider(
    client: &Client,
    provider: &ProviderName,
    operator_namespace: &str,
) -> Result<(KeyProviderSpec, String), Error> {
    let subject = provider.subject();
    let what = format!("reading {subject}");
    let missing = |kind: &str, list: &str| {
        Error::Usage(format!(
            "{subject}: no {kind} named {}; `kubectl get {list}` lists them",
            provider.name
        ))
    };
    match &provider.namespace {
        Some(ns) => {
            let found = Api::<KeyProvider>::namespaced(client.clone(), ns)
                .get_opt(&provider.name)
                .await
                .map_err(|source| Error::Kube { what, source })?;
            let p =
                found.ok_or_else(|| missing("KeyProvider", &format!("keyproviders -n {ns}")))?;
            Ok((p.spec, ns.clone()))
        }
        None => {
            let found = Api::<ClusterKeyProvider>::all(client.clone())
                .get_opt(&provider.name)
                .await
                .map_err(|source| Error::Kube { what, source })?;
            let p = found.ok_or_else(|| missing("ClusterKeyProvider", "clusterkeyproviders"))?;
            Ok((
                providers::cluster_spec(&p.spec),
                operator_namespace.to_owned(),
            ))
        }
    }
}

/// The provider's key API, built as the operator builds it, with the caller's access.
async fn build(
    client: &Client,
    provider: &ProviderName,
    args: &AuditArgs,
) -> Result<Arc<dyn KeyApi>, Error> {
    let (spec, secret_namespace) =
        read_provider(client, provider, &args.operator.operator_namespace).await?;
    let secret = providers::credential_secret(&spec).map(|(name, _)| name);
    let factory = match &args.service_account {
        Some(reference) => {
            let (namespace, name) =
                providers::identity::parse_reference(reference, &args.operator.operator_namespace)
                    .map_err(|e| Error::Usage(format!("--service-account {e}")))?;
            DefaultFactory::with_identity(ServiceAccount::new(client.clone(), namespace, name))
        }
        None => DefaultFactory::default(),
    };
    let ctx = Context::new(
        client.clone(),
        Arc::new(factory),
        Arc::new(NoFaults),
        Settings {
            operator_namespace: args.operator.operator_namespace.clone(),
            ..Settings::default()
        },
    );
    let namespace = provider.namespace.as_deref().unwrap_or_default();
    let (id, display) = resolve::provider_names(provider.kind, namespace, &provider.name);
    let source = resolve::ProviderSource {
        id,
        display,
        uid: String::new(),
        spec,
        credentials_namespace: secret_namespace.clone(),
    };
    match resolve::build_provider(&ctx, &source).await {
        Ok(api) => Ok(api),
        Err(context::Error::NotReady { reason, message }) => Err(Error::Usage(format!(
            "{} cannot be used ({reason}): {message}",
            provider.subject()
        ))),
        Err(context::Error::Kube(source)) => {
            let secret = secret.unwrap_or_default();
            let what = if is_forbidden(&source) {
                format!(
                    "reading Secret {secret_namespace}/{secret}, the credential of {}, was refused: audit lists keys with the provider's own credential, so it needs get on that Secret (check with `kubectl auth can-i get secret/{secret} -n {secret_namespace}`); ask a cluster admin for a Role that grants it, or run audit as someone who may read it. The API server said",
                    provider.subject()
                )
            } else {
                format!("reading Secret {secret_namespace}/{secret}")
            };
            Err(Error::Kube { what, source })
        }
        Err(other) => Err(Error::Usage(other.to_string())),
    }
}

fn is_forbidden(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 403)
}

/// The keys of every namespace; when the caller may not list them cluster-wide, those
/// of the provider's namespace (a KeyProvider) or of -n (a ClusterKeyProvider).
async fn read_keys(
    client: &Client,
    provider: &ProviderName,
    namespace: &str,
) -> Result<(Vec<Key>, Scope), Error> {
    let scope = |listed_only: Option<String>| Scope {
        provider: provider.clone(),
        listed_only,
    };
    match keys::list(client, None, None).await {
        Ok(all) => Ok((all, scope(None))),
        Err(Error::Kube { source, .. }) if is_forbidden(&source) => {
            let ns = provider.namespace.as_deref().unwrap_or(namespace);
            let some = keys::list(client, Some(ns), None).await?;
            Ok((some, scope(Some(ns.to_owned()))))
        }
        Err(e) => Err(e),
    }
}

fn where_read(scope: &Scope) -> String {
    scope.listed_only.as_ref().map_or_else(
        || "all namespaces".to_owned(),
        |ns| format!("namespace {ns}"),
    )
}

fn tone(state: State) -> Tone {
    match state {
        State::Current | State::Retiring => Tone::Good,
        State::InFlight | State::Unknown => Tone::Warn,
        State::NotHeld | State::ResourceGone => Tone::Bad,
    }
}

/// The text report, printed before anything is revoked: a table of the listed keys,
/// then the orphans and the keys the audit could not tie, each with why.
pub fn render(audited: &[Audited], scope: &Scope, now: jiff::Timestamp, style: Style) -> String {
    let mut out = format!(
        "{}: {} upstream key(s) with a keyward marker; keys read in {}\n",
        scope.provider.subject(),
        audited.len(),
        where_read(scope)
    );
    if audited.is_empty() {
        return out;
    }
    let none = || ("<none>".to_owned(), Tone::Plain);
    let mut table = Table::new(&[
        "key id",
        "created",
        "marker",
        "namespace",
        "resource",
        "state",
    ]);
    for a in audited {
        let t = &a.tie;
        let (namespace, resource) = match &t.resource {
            Some(r) => (
                (r.namespace.clone(), Tone::Plain),
                (
                    format!("{}/{}", r.kind.as_str().to_ascii_lowercase(), r.name),
                    Tone::Bold,
                ),
            ),
            None => (none(), none()),
        };
        table.row(vec![
            (t.id.clone(), Tone::Plain),
            t.created_at
                .as_ref()
                .map_or_else(none, |c| (relative(c.0, now), Tone::Plain)),
            (t.marker.clone(), Tone::Plain),
            namespace,
            resource,
            (t.state.label().to_owned(), tone(t.state)),
        ]);
    }
    out.push('\n');
    out.push_str(&table.render(style));
    let mut section = |title: &str, states: &[State]| {
        let lines: Vec<String> = audited
            .iter()
            .filter(|a| states.contains(&a.tie.state))
            .map(|a| format!("  {}  {}\n", a.tie.id, a.tie.detail))
            .collect();
        if !lines.is_empty() {
            out.push_str(&format!("\n{title}:\n{}", lines.concat()));
        }
    };
    section("Orphans", &[State::NotHeld, State::ResourceGone]);
    section("In flight (keyward finishes them)", &[State::InFlight]);
    section("Not tied (left alone)", &[State::Unknown]);
    out
}

/// The closing line: what was found, and what was done about it.
pub fn summary(audited: &[Audited], revoking: bool) -> String {
    let count = |state: State| audited.iter().filter(|a| a.tie.state == state).count();
    let orphans = count(State::NotHeld) + count(State::ResourceGone);
    let revoked = audited.iter().filter(|a| a.revoked).count();
    if orphans == 0 {
        return "No orphans.".to_owned();
    }
    let found = format!(
        "{orphans} orphan(s): {} not held by its resource, {} whose resource is gone",
        count(State::NotHeld),
        count(State::ResourceGone)
    );
    match (revoking, revoked == orphans) {
        (false, _) => format!("{found}. `--revoke` revokes them."),
        (true, true) => format!("{found}; all revoked."),
        (true, false) => format!("{found}; {revoked} revoked, {} left.", orphans - revoked),
    }
}

/// Whether an answer to the confirmation prompt is a yes.
pub fn confirmed(answer: &str) -> bool {
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

async fn ask(question: String) -> bool {
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        eprint!("{question} [y/N] ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    })
    .await;
    matches!(answer, Ok(Ok(line)) if confirmed(&line))
}

pub async fn run(args: AuditArgs) -> Result<bool, Error> {
    if args.connection.all_namespaces {
        return Err(Error::Usage(
            "audit names one provider: give -n NAMESPACE for a KeyProvider, not -A (keys of every namespace you may list are always considered)".into(),
        ));
    }
    let prompt = args.revoke && !args.yes;
    if prompt && !std::io::stdin().is_terminal() {
        return Err(Error::Usage(
            "--revoke asks before revoking, but stdin is not a terminal: add --yes to revoke without asking".into(),
        ));
    }
    let (client, namespace) = args.connection.connect().await?;
    let namespace = namespace.unwrap_or_default();
    let provider = parse_provider(&args.provider, &namespace)?;
    let api = build(&client, &provider, &args).await?;
    let format = args.connection.output;
    let upstream = |e: providers::ProviderError| {
        Error::Usage(format!(
            "{}: listing upstream keys: {e}",
            provider.subject()
        ))
    };
    let caps = api.capabilities();
    if !caps.local && !caps.listing {
        return Err(Error::Usage(format!(
            "{} cannot list its upstream keys, so there is nothing audit can look at: give it a list request (docs/providers/http.md)",
            provider.subject()
        )));
    }
    // Listed before the resources are read: see the module doc.
    let listed = if caps.local {
        Vec::new()
    } else {
        api.marked_keys().await.map_err(upstream)?
    };
    let (keys, scope) = read_keys(&client, &provider, &namespace).await?;
    let same = |a: &str, b: &str| api.same_key(a, b);
    let mut audited: Vec<Audited> = tie::tie(&listed, &keys, &scope, &same)
        .into_iter()
        .map(|tie| Audited {
            tie,
            revoked: false,
            revoke_error: None,
        })
        .collect();
    let style = Style::detect();
    let now = jiff::Timestamp::now();
    let text = format == super::output::Format::Text;
    if text {
        print!("{}", render(&audited, &scope, now, style));
        if caps.local {
            println!(
                "Its keys are minted by keyward and exist only in their Secrets: nothing upstream can be left behind."
            );
        }
    }
    let orphans = audited.iter().filter(|a| a.tie.orphan).count();
    let say = |line: &str| {
        if text {
            println!("{line}");
        } else {
            eprintln!("{line}");
        }
    };
    if args.revoke && orphans > 0 {
        let go = !prompt
            || ask(format!(
                "Revoke {orphans} orphaned key(s) through {}? Whatever still uses them stops working.",
                provider.subject()
            ))
            .await;
        if go {
            revoke(
                &client,
                &provider,
                &namespace,
                &*api,
                &listed,
                &mut audited,
                &say,
            )
            .await?;
        } else {
            say("Nothing revoked.");
        }
    }
    let revoked = audited.iter().filter(|a| a.revoked).count();
    // Orphans a fresh read showed held by now are no longer counted.
    let orphans = audited.iter().filter(|a| a.tie.orphan).count();
    match document(
        format,
        &Report {
            provider: provider.subject(),
            keys_read_in: where_read(&scope),
            keys: &audited,
            orphans,
            revoked,
        },
    ) {
        Some(doc) => print!("{doc}"),
        None => println!("\n{}", summary(&audited, args.revoke)),
    }
    Ok(revoked == orphans)
}

/// Revokes the orphans that are orphans still: the resources are read again first,
/// and a key that a resource holds by now (or whose attempt is in flight) is left.
async fn revoke(
    client: &Client,
    provider: &ProviderName,
    namespace: &str,
    api: &dyn KeyApi,
    listed: &[providers::MarkedKey],
    audited: &mut [Audited],
    say: &dyn Fn(&str),
) -> Result<(), Error> {
    let (keys, scope) = read_keys(client, provider, namespace).await?;
    let same = |a: &str, b: &str| api.same_key(a, b);
    let now = tie::tie(listed, &keys, &scope, &same);
    for a in audited.iter_mut().filter(|a| a.tie.orphan) {
        if let Some(fresh) = now.iter().find(|t| t.id == a.tie.id && !t.orphan) {
            say(&format!(
                "{}: left alone, it changed since the audit: {}",
                a.tie.id, fresh.detail
            ));
            a.tie = fresh.clone();
            continue;
        }
        if let Some(fresh) = now.iter().find(|t| t.id == a.tie.id) {
            a.tie = fresh.clone();
        }
        match api.revoke(&a.tie.id).await {
            Ok(()) => {
                a.revoked = true;
                say(&format!("revoked {}", a.tie.id));
            }
            Err(e) => {
                say(&format!("{}: revoking failed: {e}", a.tie.id));
                a.revoke_error = Some(e.to_string());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::MarkedKey;

    #[test]
    fn providers_are_named_as_kubectl_and_doctor_name_them() {
        let named = |word: &str| parse_provider(word, "team").map(|p| p.subject());
        assert_eq!(named("edge").unwrap(), "kp/team/edge");
        assert_eq!(named("kp/edge").unwrap(), "kp/team/edge");
        assert_eq!(
            named("keyproviders.keyward.dev/edge").unwrap(),
            "kp/team/edge"
        );
        assert_eq!(named("kp/other/edge").unwrap(), "kp/other/edge");
        assert_eq!(named("ckp/shared").unwrap(), "ckp/shared");
        assert_eq!(named("ClusterKeyProvider/shared").unwrap(), "ckp/shared");
        for bad in ["ak/edge", "ckp/ns/shared", "kp/", "", "a/b/c/d"] {
            let Err(Error::Usage(message)) = named(bad) else {
                panic!("{bad:?} accepted");
            };
            assert!(message.contains("kp/NAMESPACE/NAME"), "{message}");
        }
    }

    #[test]
    fn only_yes_confirms() {
        for yes in ["y", "Y\n", " yes\n", "YES"] {
            assert!(confirmed(yes), "{yes:?}");
        }
        for no in ["", "\n", "n", "no", "yess", "sure"] {
            assert!(!confirmed(no), "{no:?}");
        }
    }

    fn audited(listed: &[MarkedKey], keys: &[Key], scope: &Scope) -> Vec<Audited> {
        tie::tie(listed, keys, scope, &|a, b| a == b)
            .into_iter()
            .map(|tie| Audited {
                tie,
                revoked: false,
                revoke_error: None,
            })
            .collect()
    }

    #[test]
    fn the_report_names_each_orphan_and_why() {
        use crate::{
            cli::fixtures::{key, time},
            resources::KeyStatus,
        };
        let mut edge = key(
            "edge",
            KeyStatus {
                key_id: Some("k-current".into()),
                ..KeyStatus::default()
            },
        );
        edge.uid = "0123abcd-1111-2222-3333-444455556666".into();
        let created = Some(time("2026-01-01T00:00:00Z").0);
        let marked = |id: &str, marker: &str| MarkedKey {
            id: id.into(),
            marker: marker.into(),
            created_at: created,
        };
        let scope = Scope {
            provider: ProviderName::of(&edge),
            listed_only: None,
        };
        let mut report = audited(
            &[
                marked("k-current", "kw:0123abcd.00000001"),
                marked("k-stray", "kw:0123abcd.0badf00d"),
                marked("k-gone", "kw:5ee8a1b2.00000001"),
            ],
            &[edge],
            &scope,
        );
        let now = time("2026-01-01T00:05:00Z").0;
        assert_eq!(
            render(&report, &scope, now, Style::PLAIN),
            "\
kp/team/keys: 3 upstream key(s) with a keyward marker; keys read in all namespaces

KEY ID      CREATED   MARKER                 NAMESPACE   RESOURCE       STATE
k-current   5m ago    kw:0123abcd.00000001   team        authkey/edge   current
k-stray     5m ago    kw:0123abcd.0badf00d   team        authkey/edge   orphan: not held
k-gone      5m ago    kw:5ee8a1b2.00000001   <none>      <none>         orphan: resource gone

Orphans:
  k-stray  AuthKey team/edge exists but holds neither this key nor an issuance with this marker
  k-gone  no AuthKey or ServiceAccountKey in the cluster has a UID starting 5ee8a1b2
"
        );
        assert_eq!(
            summary(&report, false),
            "2 orphan(s): 1 not held by its resource, 1 whose resource is gone. `--revoke` revokes them."
        );
        report[1].revoked = true;
        assert_eq!(
            summary(&report, true),
            "2 orphan(s): 1 not held by its resource, 1 whose resource is gone; 1 revoked, 1 left."
        );
        assert_eq!(summary(&report[..1], false), "No orphans.");
    }
}
