//! The controller verbs of the CLI (`config client`, `create|get|update|delete lease`,
//! `get exporters`, `admin`, `auth rotate`, `attach` by lease), on top of [`crate::controller`].

use super::*;
use crate::controller::{self as c, Ctl, Out};
use jmp_protocol::api::{
    ClientConfig, ClientSpec, ClientUpdate, CtlErrorCode, ExporterSpec, LeaseRequest, Reply,
    Request,
};
use jmp_protocol::duration::parse_secs;
use jmp_protocol::selector::{parse_label, Labels, Selector};
use jmp_protocol::usage::UsageBy;
use jmp_transport::controller::CallError;

/// A duration that may also be `none` (0: no idle timeout, or no limit).
fn duration_or_none(flag: &str, s: &str) -> Result<u64> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(0);
    }
    duration_arg(flag, s)
}

fn duration_arg(flag: &str, s: &str) -> Result<u64> {
    let d = parse_secs(s).map_err(|e| exit(code::USAGE, format!("{flag}: {e}")))?;
    if d == 0 {
        return Err(exit(code::USAGE, format!("{flag}: must be more than zero")));
    }
    Ok(d)
}

/// Repeated `-l` selectors, each checked here so the error names its position in what the
/// user typed.
fn selector_arg(list: &[String]) -> Result<String> {
    let mut sel = Selector::default();
    for s in list {
        let one = Selector::parse(s).map_err(|e| exit(code::USAGE, format!("--selector: {e}")))?;
        sel = sel.and(one);
    }
    Ok(sel.to_string())
}

fn labels_arg(list: &[String]) -> Result<Labels> {
    let mut out = Labels::new();
    for l in list {
        let (k, v) = parse_label(l).map_err(|e| exit(code::USAGE, format!("--label: {e}")))?;
        out.insert(k, v);
    }
    Ok(out)
}

fn random_id() -> String {
    let mut b = [0u8; 12];
    rand::Rng::fill(&mut rand::thread_rng(), &mut b);
    hex::encode(b)
}

pub(super) fn config_client(cmd: ConfigClientCmd) -> Result<()> {
    match cmd {
        ConfigClientCmd::Create {
            name,
            from,
            endpoint,
            fingerprint,
            token,
            no_use,
        } => {
            jmp_protocol::name::check("client name", &name)
                .map_err(|e| exit(code::USAGE, e.to_string()))?;
            let mut cfg = match (from, endpoint, fingerprint, token) {
                (Some(f), _, _, _) => c::read_client_file(&f)?,
                (None, Some(endpoint), Some(fingerprint), Some(token)) => ClientConfig {
                    api_version: jmp_protocol::api::API_VERSION.into(),
                    kind: "ClientConfig".into(),
                    metadata: jmp_protocol::api::ClientMeta { name: name.clone() },
                    endpoint,
                    fingerprint,
                    token,
                    renew_before: None,
                },
                _ => {
                    return Err(exit(
                        2,
                        "give --from FILE, or --endpoint, --fingerprint and --token",
                    ))
                }
            };
            cfg.fingerprint
                .parse::<jmp_transport::Fingerprint>()
                .map_err(|e| exit(code::USAGE, format!("--fingerprint: {e}")))?;
            cfg.metadata.name = name.clone();
            let path = c::clients_dir().join(format!("{name}.yaml"));
            c::write_client_file(&path, &cfg)?;
            outln!("client config {name} written to {}", path.display());
            if !no_use {
                set_current(&name)?;
            }
            Ok(())
        }
        ConfigClientCmd::Use { name } => {
            let path = c::clients_dir().join(format!("{name}.yaml"));
            if !path.exists() {
                return Err(exit(
                    2,
                    format!("no client config {name:?} (expected {})", path.display()),
                ));
            }
            set_current(&name)
        }
        ConfigClientCmd::List { output } => {
            let current = c::load_client(None).ok().map(|(cfg, _)| cfg.metadata.name);
            let mut rows = Vec::new();
            if let Ok(rd) = std::fs::read_dir(c::clients_dir()) {
                for e in rd.flatten() {
                    let p = e.path();
                    if p.extension().is_some_and(|x| x == "yaml") {
                        if let Ok(cfg) = c::read_client_file(&p) {
                            rows.push(cfg);
                        }
                    }
                }
            }
            rows.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
            match output {
                Out::Name => {
                    for r in &rows {
                        outln!("{}", r.metadata.name);
                    }
                }
                Out::Json | Out::Yaml => {
                    // Never print tokens in listings.
                    let v: Vec<serde_json::Value> = rows
                        .iter()
                        .map(|r| {
                            serde_json::json!({
                                "name": r.metadata.name,
                                "endpoint": r.endpoint,
                                "current": Some(&r.metadata.name) == current.as_ref(),
                            })
                        })
                        .collect();
                    if output == Out::Json {
                        outln!("{}", serde_json::to_string_pretty(&v)?);
                    } else {
                        out!("{}", serde_norway::to_string(&v)?);
                    }
                }
                Out::Table => {
                    outln!("CURRENT  NAME  ENDPOINT");
                    for r in &rows {
                        let mark = if Some(&r.metadata.name) == current.as_ref() {
                            "*"
                        } else {
                            ""
                        };
                        outln!("{mark:7}  {}  {}", r.metadata.name, r.endpoint);
                    }
                }
            }
            Ok(())
        }
        ConfigClientCmd::Delete { name } => {
            let path = c::clients_dir().join(format!("{name}.yaml"));
            std::fs::remove_file(&path).map_err(|e| {
                exit(
                    code::USAGE,
                    format!("cannot delete {}: {e}", path.display()),
                )
            })?;
            outln!("client config {name} deleted");
            Ok(())
        }
    }
}

fn set_current(name: &str) -> Result<()> {
    c::set_current(name)?;
    outln!("using client {name}");
    Ok(())
}

pub(super) fn create_cmd(what: CreateCmd) -> Result<()> {
    let CreateCmd::Lease {
        selector,
        exporter,
        duration,
        idle_timeout,
        auto_extend,
        max_duration,
        begin_time,
        wait,
        output,
        reuse,
        client,
    } = what;
    let sel = selector_arg(&selector)?;
    if sel.is_empty() && exporter.is_none() {
        return Err(exit(
            2,
            "say which exporter: --selector KEY=VALUE (repeatable) or --name EXPORTER",
        ));
    }
    let duration_secs = duration_arg("--duration", &duration)?;
    let idle_timeout_secs = idle_timeout
        .as_deref()
        .map(|d| duration_or_none("--idle-timeout", d))
        .transpose()?;
    let max_duration_secs = max_duration
        .as_deref()
        .map(|d| duration_arg("--max-duration", d))
        .transpose()?;
    if max_duration_secs.is_some_and(|m| m < duration_secs) {
        return Err(exit(
            code::USAGE,
            format!(
                "--max-duration {} is shorter than --duration {duration}",
                max_duration.unwrap_or_default()
            ),
        ));
    }
    let begin = match begin_time {
        Some(t) => Some(
            humantime::parse_rfc3339_weak(&t)
                .map_err(|e| {
                    exit(
                        2,
                        format!("--begin-time {t:?}: {e} (use e.g. 2026-11-25T14:00:00Z)"),
                    )
                })?
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        ),
        None => None,
    };
    let (cfg, _) = c::load_client(client.client.as_deref())?;
    let req = LeaseRequest {
        request_id: random_id(),
        selector: sel,
        exporter,
        duration_secs,
        begin_time: begin,
        wait_secs: wait,
        job: c::current_job(),
        idle_timeout_secs,
        auto_extend,
        max_duration_secs,
    };
    runtime()?.block_on(async {
        if reuse {
            let ctl = Ctl::connect(&cfg).await?;
            if let Some(l) = reusable_lease(&ctl, &req).await? {
                // Found for use: a use, so it does not end as idle before its user attaches.
                let l = match ctl
                    .call(Request::TouchLease {
                        name: Some(l.name.clone()),
                    })
                    .await?
                {
                    Reply::Lease(now) => now,
                    other => return Err(c::unexpected(other)),
                };
                eprintln!("jmp: using lease {} on {} (--reuse)", l.name, l.exporter);
                return match output {
                    c::Out::Json => {
                        let mut v = serde_json::to_value(&l)?;
                        if let Some(m) = v.as_object_mut() {
                            m.insert("reused".into(), serde_json::Value::Bool(true));
                        }
                        outln!("{v}");
                        Ok(())
                    }
                    other => c::print_lease(&l, other),
                };
            }
        }
        let lease = c::create_lease(
            &cfg,
            c::CreateLease {
                request: req,
                out: output,
            },
        )
        .await?;
        c::print_lease(&lease, output)
    })
}

/// `--reuse`: an active lease of this job (outside CI: of this client, with no job tag) on an
/// exporter `req` would match; the oldest when there are several.
async fn reusable_lease(
    ctl: &Ctl,
    req: &LeaseRequest,
) -> Result<Option<jmp_protocol::api::LeaseInfo>> {
    let leases = match ctl.call(Request::GetLeases { all: false }).await? {
        Reply::Leases { leases } => leases,
        other => return Err(c::unexpected(other)),
    };
    let mut mine: Vec<jmp_protocol::api::LeaseInfo> = leases
        .into_iter()
        .filter(|l| l.status == "active" && l.job == req.job)
        .collect();
    if mine.is_empty() {
        return Ok(None);
    }
    let matching: Vec<String> = match ctl
        .call(Request::GetExporters {
            selector: Some(req.selector.clone()),
        })
        .await?
    {
        Reply::Exporters { exporters } => exporters
            .into_iter()
            .filter(|e| req.exporter.as_ref().is_none_or(|n| *n == e.name))
            .map(|e| e.name)
            .collect(),
        other => return Err(c::unexpected(other)),
    };
    mine.retain(|l| matching.contains(&l.exporter));
    mine.sort_by_key(|l| l.begin);
    Ok(mine.into_iter().next())
}

pub(super) fn get_cmd(what: GetCmd) -> Result<()> {
    match what {
        GetCmd::Leases {
            all,
            output,
            client,
        } => {
            let (cfg, _) = c::load_client(client.client.as_deref())?;
            runtime()?.block_on(async {
                let ctl = Ctl::connect(&cfg).await?;
                match ctl.call(Request::GetLeases { all }).await? {
                    Reply::Leases { leases } => c::print_leases(&leases, output),
                    other => Err(c::unexpected(other)),
                }
            })
        }
        GetCmd::Exporters {
            selector,
            with,
            output,
            client,
        } => {
            let sel = selector_arg(&selector)?;
            for w in &with {
                if w != "leases" && w != "online" {
                    return Err(exit(
                        code::USAGE,
                        format!("--with {w:?}: expected leases or online"),
                    ));
                }
            }
            let (cfg, _) = c::load_client(client.client.as_deref())?;
            runtime()?.block_on(async {
                let ctl = Ctl::connect(&cfg).await?;
                match ctl
                    .call(Request::GetExporters {
                        selector: Some(sel),
                    })
                    .await?
                {
                    Reply::Exporters { exporters } => c::print_exporters(&exporters, &with, output),
                    other => Err(c::unexpected(other)),
                }
            })
        }
    }
}

pub(super) fn update_cmd(what: UpdateCmd) -> Result<()> {
    let UpdateCmd::Lease {
        name,
        duration,
        extend,
        output,
        client,
    } = what;
    let duration_secs = duration
        .as_deref()
        .map(|d| duration_arg("--duration", d))
        .transpose()?;
    let extend_secs = extend
        .as_deref()
        .map(|d| duration_arg("--extend", d))
        .transpose()?;
    let (cfg, _) = c::load_client(client.client.as_deref())?;
    runtime()?.block_on(async {
        let ctl = Ctl::connect(&cfg).await?;
        match ctl
            .call(Request::UpdateLease {
                name,
                duration_secs,
                extend_secs,
            })
            .await?
        {
            Reply::Lease(l) => c::print_lease(&l, output),
            other => Err(c::unexpected(other)),
        }
    })
}

/// `JMP_LEASE`, when set: the lease every command of this job means.
fn lease_env() -> Option<String> {
    std::env::var("JMP_LEASE")
        .ok()
        .filter(|l| !l.trim().is_empty())
}

/// The caller's only lease (active or waiting), or why there is none.
async fn names_of_only_lease(ctl: &Ctl) -> Result<Vec<String>> {
    let leases = match ctl.call(Request::GetLeases { all: false }).await? {
        Reply::Leases { leases } => leases,
        other => return Err(c::unexpected(other)),
    };
    match leases.as_slice() {
        [l] => Ok(vec![l.name.clone()]),
        [] => Err(exit(code::UNAVAILABLE, "you hold no lease")),
        many => Err(exit(
            code::USAGE,
            format!(
                "you hold {} leases ({}); name them or use --all",
                many.len(),
                many.iter()
                    .map(|l| l.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

pub(super) fn delete_cmd(what: DeleteCmd) -> Result<()> {
    let DeleteCmd::Lease { names, all, client } = what;
    let (cfg, _) = c::load_client(client.client.as_deref())?;
    runtime()?.block_on(async {
        let ctl = Ctl::connect(&cfg).await?;
        // Named, else JMP_LEASE, else this CI job's lease, else the client's only one.
        let names = if !names.is_empty() || all {
            names
        } else if let Some(l) = lease_env() {
            vec![l]
        } else if let Some(l) = c::job_lease(&ctl).await? {
            vec![l]
        } else {
            names_of_only_lease(&ctl).await?
        };
        match ctl.call(Request::DeleteLease { names, all }).await? {
            Reply::Deleted { names } => {
                for n in names {
                    outln!("lease {n} deleted");
                }
                Ok(())
            }
            other => Err(c::unexpected(other)),
        }
    })
}

/// A point in time for `--since`/`--until`, Unix ms: `2026-11-01` (UTC midnight), an RFC 3339
/// time (`2026-11-01T08:00:00Z`), or a duration before `now` (`30d`).
fn time_arg(flag: &str, s: &str, now: u64) -> Result<u64> {
    let t = s.trim();
    let bad = |why: String| {
        exit(
            code::USAGE,
            format!("{flag} {t:?}: {why} (a date like 2026-11-01, an RFC 3339 time, or a duration ago like 30d)"),
        )
    };
    if t.chars().next().is_some_and(|c| c.is_ascii_digit()) && t.contains('-') {
        let full = if t.len() == 10 {
            format!("{t}T00:00:00Z")
        } else {
            t.to_string()
        };
        let at = humantime::parse_rfc3339_weak(&full).map_err(|e| bad(e.to_string()))?;
        let ms = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| bad("before 1970".into()))?
            .as_millis();
        return u64::try_from(ms).map_err(|_| bad("too far in the future".into()));
    }
    let ago = jmp_protocol::duration::parse_secs(t).map_err(|e| bad(e.to_string()))?;
    Ok(now.saturating_sub(ago.saturating_mul(1000)))
}

pub(super) fn admin_cmd(cmd: AdminCmd, admin_config: Option<PathBuf>) -> Result<()> {
    let cfg = c::load_admin(admin_config.as_deref())?;
    let enable = matches!(cmd, AdminCmd::Enable { .. });
    let rt = runtime()?;
    rt.block_on(async {
        let ctl = Ctl::connect(&cfg).await?;
        match cmd {
            AdminCmd::Create { what } => match what {
                AdminCreate::Client {
                    name,
                    labels,
                    allow,
                    max_duration,
                    max_idle_timeout,
                    admin,
                    replace,
                    out,
                    save,
                } => {
                    if let Some(Err(e)) = allow.as_deref().map(Selector::parse) {
                        return Err(exit(code::USAGE, format!("--allow: {e}")));
                    }
                    let max_duration_secs = max_duration
                        .as_deref()
                        .map(|d| duration_arg("--max-duration", d))
                        .transpose()?;
                    let max_idle_timeout_secs = max_idle_timeout
                        .as_deref()
                        .map(|d| duration_or_none("--max-idle-timeout", d))
                        .transpose()?;
                    let labels = labels_arg(&labels)?;
                    let mut replaced = false;
                    let reissued = if replace {
                        let u = ClientUpdate {
                            name: name.clone(),
                            labels: (!labels.is_empty()).then(|| labels.clone()),
                            allow: allow.clone(),
                            max_duration_secs,
                            max_idle_timeout_secs,
                            admin: admin.then_some(true),
                            reissue: true,
                        };
                        match ctl.try_call(Request::UpdateClient(u)).await {
                            Ok(Reply::Credential(cr)) => {
                                replaced = true;
                                Some(cr)
                            }
                            Ok(other) => return Err(c::unexpected(other)),
                            // Not there yet: --replace creates it.
                            Err(CallError::Refused(e)) if e.code == CtlErrorCode::NotFound => None,
                            Err(e) => return Err(c::call_error(e, &cfg.endpoint)),
                        }
                    } else {
                        None
                    };
                    let cred = match reissued {
                        Some(cr) => cr,
                        None => {
                            let spec = ClientSpec {
                                name: name.clone(),
                                labels,
                                allow: allow.unwrap_or_default(),
                                max_duration_secs: max_duration_secs.unwrap_or(0),
                                max_idle_timeout_secs: max_idle_timeout_secs.unwrap_or(0),
                                admin,
                            };
                            match ctl.call(Request::CreateClient(spec)).await? {
                                Reply::Credential(cr) => cr,
                                other => return Err(c::unexpected(other)),
                            }
                        }
                    };
                    let done = if replaced {
                        "given a new credential (the old one is revoked)"
                    } else {
                        "created"
                    };
                    let cc = c::credential_config(&cred);
                    if save {
                        let p = c::clients_dir().join(format!("{name}.yaml"));
                        c::write_client_file(&p, &cc)?;
                        eprintln!("client config saved to {}", p.display());
                        if c::load_client(None).is_err() {
                            set_current(&name)?;
                        }
                    }
                    match out {
                        Some(p) => {
                            c::write_client_file(&p, &cc)?;
                            eprintln!("client {name} {done}; its config is in {}", p.display());
                        }
                        None if !save => out!("{}", serde_norway::to_string(&cc)?),
                        None => {}
                    }
                    Ok(())
                }
                AdminCreate::Exporter { name, labels, out } => {
                    let spec = ExporterSpec {
                        name: name.clone(),
                        labels: labels_arg(&labels)?,
                    };
                    match ctl.call(Request::CreateExporter(spec)).await? {
                        Reply::Credential(cr) => {
                            match out {
                                // A credential is a secret: written 0600, never through a
                                // shell redirection that leaves it 0644.
                                Some(p) => {
                                    jmp_transport::write_secret_file(&p, format!("{}\n", cr.token).as_bytes())
                                        .map_err(|e| exit(code::FAILURE, format!("cannot write {}: {e}", p.display())))?;
                                    eprintln!("exporter {name} created; its credential is in {} (mode 0600)", p.display());
                                }
                                None => outln!("{}", cr.token),
                            }
                            Ok(())
                        }
                        other => Err(c::unexpected(other)),
                    }
                }
            },
            AdminCmd::Update {
                what:
                    AdminUpdate::Client {
                        name,
                        allow,
                        max_duration,
                        max_idle_timeout,
                        labels,
                        output,
                    },
            } => {
                if let Some(Err(e)) = allow.as_deref().map(Selector::parse) {
                    return Err(exit(code::USAGE, format!("--allow: {e}")));
                }
                let max_duration_secs = match max_duration.as_deref() {
                    None => None,
                    Some("default") => Some(0),
                    Some(d) => Some(duration_arg("--max-duration", d)?),
                };
                let max_idle_timeout_secs = max_idle_timeout
                    .as_deref()
                    .map(|d| duration_or_none("--max-idle-timeout", d))
                    .transpose()?;
                if allow.is_none()
                    && max_duration_secs.is_none()
                    && max_idle_timeout_secs.is_none()
                    && labels.is_empty()
                {
                    return Err(exit(
                        code::USAGE,
                        "nothing to change: give --allow, --max-duration, --max-idle-timeout or --label (a new credential: jmp admin create client NAME --replace)",
                    ));
                }
                let u = ClientUpdate {
                    name,
                    labels: (!labels.is_empty())
                        .then(|| labels_arg(&labels))
                        .transpose()?,
                    allow,
                    max_duration_secs,
                    max_idle_timeout_secs,
                    admin: None,
                    reissue: false,
                };
                match ctl.call(Request::UpdateClient(u)).await? {
                    Reply::Clients { clients } => c::print_clients(&clients, output),
                    other => Err(c::unexpected(other)),
                }
            }
            AdminCmd::Get { what } => match what {
                AdminGet::Clients { name, output } => {
                    match ctl.call(Request::GetClients { name }).await? {
                        Reply::Clients { clients } => c::print_clients(&clients, output),
                        other => Err(c::unexpected(other)),
                    }
                }
                AdminGet::Exporters { selector, output } => {
                    let sel = selector_arg(&selector)?;
                    match ctl
                        .call(Request::GetExporters {
                            selector: Some(sel),
                        })
                        .await?
                    {
                        Reply::Exporters { exporters } => c::print_exporters(
                            &exporters,
                            &["online".into(), "leases".into()],
                            output,
                        ),
                        other => Err(c::unexpected(other)),
                    }
                }
            },
            AdminCmd::Delete { what } => {
                let (req, what) = match what {
                    AdminDelete::Client { name } => (
                        Request::DeleteClient { name: name.clone() },
                        format!("client {name}"),
                    ),
                    AdminDelete::Exporter { name } => (
                        Request::DeleteExporter { name: name.clone() },
                        format!("exporter {name}"),
                    ),
                };
                match ctl.call(req).await? {
                    Reply::Deleted { .. } => {
                        outln!("{what} deleted");
                        Ok(())
                    }
                    other => Err(c::unexpected(other)),
                }
            }
            AdminCmd::Usage {
                since,
                until,
                by,
                output,
            } => {
                let now = jmp_transport::unix_now().saturating_mul(1000);
                let since = time_arg("--since", &since, now)?;
                let until = until
                    .as_deref()
                    .map(|u| time_arg("--until", u, now))
                    .transpose()?;
                if until.is_some_and(|u| u <= since) {
                    return Err(exit(code::USAGE, "--until must be after --since"));
                }
                let q = jmp_protocol::usage::UsageQuery {
                    since,
                    until,
                    by: match by {
                        UsageByArg::Team => UsageBy::Team,
                        UsageByArg::Client => UsageBy::Client,
                        UsageByArg::Exporter => UsageBy::Exporter,
                        UsageByArg::Lease => UsageBy::Lease,
                    },
                };
                match ctl.call(Request::Usage(q)).await? {
                    Reply::Usage(r) => {
                        if let Some(from) = r.history_from {
                            eprintln!(
                                "warning: the controller's usage history starts at {} (its --usage-retention): earlier leases are missing",
                                c::fmt_time(from / 1000)
                            );
                        }
                        if r.truncated {
                            eprintln!(
                                "warning: only the first {} leases are shown; narrow the window",
                                r.rows.len()
                            );
                        }
                        match output {
                            UsageOut::Json => {
                                outln!("{}", serde_json::to_string_pretty(&r.json())?)
                            }
                            UsageOut::Csv => out!("{}", r.csv()),
                            UsageOut::Table => {
                                let (header, rows) = r.table();
                                out!("{}", crate::table::render(Some(&header), &rows))
                            }
                        }
                        Ok(())
                    }
                    other => Err(c::unexpected(other)),
                }
            }
            AdminCmd::Rebind { name, .. } => {
                match ctl.call(Request::RebindExporter { name: name.clone() }).await? {
                    Reply::Done => {
                        outln!("exporter {name}: fingerprint unbound; its next registration binds the one it presents");
                        Ok(())
                    }
                    other => Err(c::unexpected(other)),
                }
            }
            AdminCmd::Disable { name, .. } | AdminCmd::Enable { name, .. } => {
                let enabled = enable;
                match ctl
                    .call(Request::SetExporterEnabled {
                        name: name.clone(),
                        enabled,
                    })
                    .await?
                {
                    Reply::Done => {
                        outln!(
                            "exporter {name} {}",
                            if enabled { "enabled" } else { "disabled" }
                        );
                        Ok(())
                    }
                    other => Err(c::unexpected(other)),
                }
            }
        }
    })
}

pub(super) fn auth_cmd(cmd: AuthCmd) -> Result<()> {
    let AuthCmd::Rotate { client } = cmd;
    let (cfg, path) = c::load_client(client.client.as_deref())?;
    runtime()?.block_on(async {
        let ctl = Ctl::connect(&cfg).await?;
        match ctl.call(Request::Rotate).await? {
            Reply::Credential(cr) => {
                let mut next = cfg.clone();
                next.token = cr.token;
                c::write_client_file(&path, &next)?;
                outln!(
                    "credential of {} rotated and saved to {}; the old one is revoked",
                    cr.name,
                    path.display()
                );
                Ok(())
            }
            other => Err(c::unexpected(other)),
        }
    })
}

/// `jmp attach` without `--exporter`: ask the controller for the lease's exporter and token,
/// then connect straight to the exporter.
pub(super) fn attach_lease(a: AttachArgs) -> Result<()> {
    let (cfg, _) = c::load_client(a.client.client.as_deref())?;
    let json = a.common.output == Format::Json;
    runtime()?.block_on(async {
        let ctl = Ctl::connect(&cfg).await?;
        // Named (or JMP_LEASE), else this CI job's lease, else the client's only one.
        let name = match a.lease.clone() {
            Some(l) => Some(l),
            None => c::job_lease(&ctl).await?,
        };
        let access = match c::access(&ctl, name.clone()).await {
            Ok(a) => a,
            Err(e) => match wait_for_reservation(&cfg, &ctl, name.as_deref()).await? {
                Some(granted) => c::access(&ctl, Some(granted)).await?,
                None => return Err(e),
            },
        };
        ctl.close();
        let addr = access
            .address
            .to_socket_addrs()
            .map_err(|e| {
                exit(
                    code::FAILURE,
                    format!("exporter address {:?}: {e}", access.address),
                )
            })?
            .next()
            .ok_or_else(|| {
                exit(
                    code::FAILURE,
                    format!("exporter address {:?} resolves to nothing", access.address),
                )
            })?;
        let pin = Pin::Fingerprint(access.fingerprint.parse().map_err(|e: String| {
            exit(
                code::FAILURE,
                format!("exporter fingerprint from the controller: {e}"),
            )
        })?);
        let mut opts = a.common.options(addr, access.token.clone(), pin)?;
        let lease = access.lease.name.clone();
        opts.lease = Some(lease.clone());
        // `--via relay` asks even when the exporter did not say it takes relayed sessions:
        // the controller's refusal then says why.
        if access.relay || a.via == crate::cli::ViaArg::Relay {
            opts.relay = Some(relay_route(&cfg, a.via.into()));
        }
        tracing::info!(
            "lease {lease}: exporter {} at {}, until {}",
            access.lease.exporter,
            access.address,
            c::fmt_time(access.lease.end)
        );
        // Before each reconnect, a fresh token: the lease may have been extended since.
        let refresh_cfg = cfg.clone();
        opts.token_refresh = Some(Box::new(move || {
            let cfg = refresh_cfg.clone();
            let lease = lease.clone();
            Box::pin(async move {
                let ctl = Ctl::connect(&cfg).await.ok()?;
                let a = c::access(&ctl, Some(lease)).await.ok()?;
                ctl.close();
                Some(a.token)
            })
        }));
        run_attachment(opts, json, None).await
    })
}

/// The controller's relay as a way to the exporter: each use asks the controller for a relay
/// session with the lease token (the controller checks it), and resolves where the relay is.
pub(crate) fn relay_route(
    cfg: &ClientConfig,
    via: crate::attach::Via,
) -> crate::attach::RelayRoute {
    let cfg = cfg.clone();
    crate::attach::RelayRoute {
        via,
        open: Box::new(move |token| {
            let cfg = cfg.clone();
            Box::pin(async move {
                use jmp_protocol::ErrorCode;
                let other = |e: String| (ErrorCode::Internal, e);
                let ctl = Ctl::connect(&cfg)
                    .await
                    .map_err(|e| other(format!("{e:#}")))?;
                let r = match ctl.stream(Request::Relay { token }).await {
                    Ok(s) => s.last().await,
                    Err(e) => Err(e),
                }
                .map_err(|e| {
                    use jmp_protocol::api::CtlErrorCode as C;
                    use jmp_transport::controller::CallError;
                    // The lease is over, or the token or the request is refused: no retry
                    // helps. Anything else (the exporter briefly away) may pass.
                    let code = match &e {
                        CallError::Refused(r) if r.code == C::NotFound => ErrorCode::LeaseEnded,
                        CallError::Refused(r)
                            if matches!(r.code, C::Unauthorized | C::Forbidden) =>
                        {
                            ErrorCode::Unauthorized
                        }
                        _ => ErrorCode::Internal,
                    };
                    (code, e.to_string())
                });
                // The controller that answered (the leader) runs the relay.
                let at = ctl.remote();
                ctl.close();
                let g = match r? {
                    Reply::Relay(g) => g,
                    other_reply => {
                        return Err(other(format!(
                            "unexpected answer from the controller: {other_reply:?}"
                        )))
                    }
                };
                let secret = jmp_protocol::relay::parse_secret(&g.secret).map_err(other)?;
                let addr = match &g.host {
                    None => SocketAddr::new(
                        at.ok_or_else(|| other("the controller's connection closed".into()))?
                            .ip(),
                        g.port,
                    ),
                    Some(h) => (h.as_str(), g.port)
                        .to_socket_addrs()
                        .map_err(|e| other(format!("relay host {h:?}: {e}")))?
                        .next()
                        .ok_or_else(|| other(format!("relay host {h:?} resolves to nothing")))?,
                };
                Ok((addr, secret))
            })
        }),
    }
}

/// `jmp attach` on a reservation (or a request still waiting): waits, with the queue line, until
/// it is granted, and returns its name; `None` if `name` (or the client's only request) is not
/// waiting at all.
async fn wait_for_reservation(
    cfg: &ClientConfig,
    ctl: &Ctl,
    name: Option<&str>,
) -> Result<Option<String>> {
    let leases = match ctl.call(Request::GetLeases { all: false }).await? {
        Reply::Leases { leases } => leases,
        other => return Err(c::unexpected(other)),
    };
    let waiting: Vec<&jmp_protocol::api::LeaseInfo> = leases
        .iter()
        .filter(|l| l.status != "active" && name.is_none_or(|n| n == l.name))
        .collect();
    let [w] = waiting.as_slice() else {
        return Ok(None);
    };
    if w.status == "reserved" {
        eprintln!(
            "jmp: lease {} is reserved from {}; waiting for it to begin",
            w.name,
            c::fmt_time(w.begin)
        );
    }
    // The same request id finds its place in the queue; waiting on it returns the lease once
    // granted (or fails when the request gives up).
    let req = LeaseRequest {
        request_id: w.request_id.clone(),
        selector: w.selector.clone(),
        exporter: (!w.exporter.is_empty()).then(|| w.exporter.clone()),
        duration_secs: 1,
        begin_time: None,
        wait_secs: w.end.saturating_sub(jmp_transport::unix_now()).max(1),
        job: w.job.clone(),
        ..Default::default()
    };
    let l = c::create_lease(
        cfg,
        c::CreateLease {
            request: req,
            out: Out::Name,
        },
    )
    .await?;
    Ok(Some(l.name))
}
