//! `sfd`'s Prometheus endpoint on a cluster of real daemons: its text passes
//! `promtool check metrics`, its counters agree with the job that ran and
//! with `sf stats`, and a real Prometheus server scrapes every host and
//! answers a query over its HTTP API.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{cluster, field, start, stats, wait};
use snowflock_control::VmOutcome;
use snowflock_testkit::HostInfo;

const METRICS_PORT: u16 = 9464;
const PROMETHEUS_PORT: u16 = 9090;
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0";

/// Runs `command ARGS` inside network namespace `netns`, killed after 30 s.
fn in_netns(netns: &str, command: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .args(["30", "ip", "netns", "exec", netns, command])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {command} in {netns}: {e}"))
}

/// `GET url` from inside `host`'s namespace, with an optional Accept header:
/// the status code and the body.
fn get(host: &HostInfo, url: &str, accept: Option<&str>) -> (u16, String) {
    let header = accept.map(|a| format!("Accept: {a}"));
    let mut args = vec!["-s", "-o", "-", "-w", "\n%{http_code}", url];
    if let Some(header) = &header {
        args.extend(["-H", header]);
    }
    let output = in_netns(&host.netns, "curl", &args);
    assert!(output.status.success(), "curl {url}: {output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

fn metrics_url(host: &HostInfo) -> String {
    format!("http://{}:{METRICS_PORT}/metrics", host.control.ip())
}

/// Samples of a Prometheus text exposition, by name with labels as written
/// (`name{label="value"}`).
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (name, value) = line.rsplit_once(' ').unwrap();
            (name.to_string(), value.parse().unwrap())
        })
        .collect()
}

fn sample(samples: &HashMap<String, f64>, name: &str) -> f64 {
    *samples
        .get(name)
        .unwrap_or_else(|| panic!("no sample {name} in {samples:#?}"))
}

/// `promtool check metrics` on `text`: lints names, types, units and help.
fn promtool_check(text: &str) {
    use std::io::Write;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package, installed by scripts/deps.sh)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = promtool.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A Prometheus server in a host's namespace; killed on drop.
struct Prometheus {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts one on `host` scraping every host's `sfd` each second.
    fn start(host: &HostInfo, targets: &[&HostInfo]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let targets: Vec<String> = targets
            .iter()
            .map(|t| format!("'{}:{METRICS_PORT}'", t.control.ip()))
            .collect();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  \
                 - job_name: sfd\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &host.netns, "prometheus"])
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!(
                "--web.listen-address={}:{PROMETHEUS_PORT}",
                host.control.ip()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus (Debian's prometheus package, installed by scripts/deps.sh)");
        Prometheus { child, _dir: dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Prometheus' answer to instant query `query`, as JSON (`None` if it gave none).
    fn ask(&self, host: &HostInfo, query: &str) -> Option<serde_json::Value> {
        let url = format!(
            "http://{}:{PROMETHEUS_PORT}/api/v1/query",
            host.control.ip()
        );
        let output = in_netns(
            &host.netns,
            "curl",
            &["-s", "--data-urlencode", &format!("query={query}"), &url],
        );
        serde_json::from_slice(&output.stdout).ok()
    }

    /// The single value of instant query `query`, if it has one yet.
    fn query(&self, host: &HostInfo, query: &str) -> Option<f64> {
        let answer = self.ask(host, query)?;
        let result = answer["data"]["result"].as_array()?;
        let [only] = result.as_slice() else {
            return None;
        };
        only["value"][1].as_str()?.parse().ok()
    }

    /// Whether Prometheus accepts `query` (it parses and evaluates).
    fn accepts(&self, host: &HostInfo, query: &str) -> Result<(), String> {
        let answer = self
            .ask(host, query)
            .ok_or_else(|| format!("no answer to {query}"))?;
        match answer["status"].as_str() {
            Some("success") => Ok(()),
            _ => Err(answer.to_string()),
        }
    }

    /// Waits (bounded) until `query` answers `expected`.
    fn wait_for(&self, host: &HostInfo, query: &str, expected: f64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = None;
        while Instant::now() < deadline {
            last = self.query(host, query);
            if last == Some(expected) {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!(
            "Prometheus answered {query} with {last:?}, not {expected}; its log:\n{}",
            self.log()
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every query of the Grafana dashboard in `dist/grafana/`.
fn dashboard_queries() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/grafana/snowflock.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let queries: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .map(|target| target["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(queries.len() > 10, "{queries:?}");
    queries
}

/// The `snowflock_*` names a query uses.
fn metric_names(query: &str) -> Vec<String> {
    query
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("snowflock_"))
        .map(str::to_string)
        .collect()
}

#[test]
fn metrics_of_a_cross_host_job_pass_promtool_agree_with_the_job_and_reach_prometheus() {
    let (cluster, _dir) = cluster(2, 4, |spec| spec.metrics_port = Some(METRICS_PORT));
    let hosts = cluster.hosts();
    let (h1, h2) = (&hosts[0], &hosts[1]);
    let prometheus = Prometheus::start(h1, &[h1, h2]);

    let vm = start(
        &h1.socket,
        "seqsearch",
        256 << 20,
        "ref_mib=16 queries=4000 clones=4",
    );
    let ended = wait(&h1.socket, vm);
    assert_eq!(ended.outcome, VmOutcome::Exited(0), "{:#?}", ended.lines);
    assert_eq!(field(&ended.lines, "seqsearch: ref_mib", "check"), "ok");
    let report = &ended.reports[0];
    let remote = report.children.iter().filter(|c| c.host.is_some()).count() as f64;
    let local = f64::from(report.clones) - remote;
    assert!(remote > 0.0, "no clone went to h2: {report:?}");

    // The parent's host: what the guest asked for and got, and how it ended.
    let (status, text) = get(h1, &metrics_url(h1), None);
    assert_eq!(status, 200, "{text}");
    promtool_check(&text);
    let parent = samples(&text);
    assert_eq!(sample(&parent, "snowflock_tickets_total"), 1.0);
    assert_eq!(
        sample(&parent, "snowflock_allocation_requested_clones_total"),
        4.0
    );
    assert_eq!(
        sample(
            &parent,
            "snowflock_clones_started_total{placement=\"remote\"}"
        ),
        remote
    );
    if local > 0.0 {
        assert_eq!(
            sample(
                &parent,
                "snowflock_clones_started_total{placement=\"local\"}"
            ),
            local
        );
    }
    assert_eq!(
        sample(&parent, "snowflock_clones_ended_total{outcome=\"result\"}"),
        f64::from(report.clones)
    );
    assert_eq!(
        sample(&parent, "snowflock_clone_latency_seconds_count"),
        1.0
    );
    assert_eq!(
        sample(
            &parent,
            "snowflock_clone_latency_seconds_bucket{le=\"+Inf\"}"
        ),
        1.0
    );
    assert!(sample(&parent, "snowflock_descriptor_bytes_total") > 0.0);
    assert!(
        sample(
            &parent,
            "snowflock_sent_bytes_total{distribution=\"mcdist\"}"
        ) > 0.0
    );
    assert_eq!(
        sample(&parent, "snowflock_vms_running{role=\"root\"}"),
        0.0,
        "the job ended"
    );

    // The clone host: its faults are the ones `sf stats` lists per clone.
    let (status, text) = get(h2, &metrics_url(h2), None);
    assert_eq!(status, 200, "{text}");
    promtool_check(&text);
    let child = samples(&text);
    let listed = stats(&h2.socket);
    let h2_stats = listed.iter().find(|h| h.host == h2.name).unwrap();
    let faults: u64 = h2_stats.clones.iter().map(|c| c.stats.faults).sum();
    let waited: u64 = h2_stats
        .clones
        .iter()
        .map(|c| c.stats.fetch_latency.count)
        .sum();
    assert!(faults > 0, "{h2_stats:#?}");
    assert_eq!(sample(&child, "snowflock_faults_total"), faults as f64);
    assert_eq!(
        sample(&child, "snowflock_network_faults_total"),
        waited as f64
    );
    assert_eq!(
        sample(&child, "snowflock_fault_latency_seconds_count"),
        faults as f64
    );
    assert_eq!(
        sample(
            &child,
            "snowflock_fault_latency_seconds_bucket{le=\"+Inf\"}"
        ),
        faults as f64
    );
    assert!(
        sample(
            &child,
            "snowflock_received_bytes_total{distribution=\"mcdist\"}"
        ) > 0.0
    );

    // OpenMetrics to a scraper that asks for it; nothing but /metrics.
    let (status, text) = get(h2, &metrics_url(h2), Some(OPENMETRICS));
    assert_eq!(status, 200);
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(text.contains("# UNIT snowflock_fault_latency_seconds seconds"));
    let (status, _) = get(
        h2,
        &format!("http://{}:{METRICS_PORT}/other", h2.control.ip()),
        None,
    );
    assert_eq!(status, 404);

    // A real Prometheus server scraped both hosts and sums their counters.
    prometheus.wait_for(h1, "count(up{job=\"sfd\"} == 1)", 2.0);
    prometheus.wait_for(
        h1,
        "sum(snowflock_clones_started_total)",
        f64::from(report.clones),
    );
    prometheus.wait_for(h1, "sum(snowflock_faults_total)", faults as f64);

    // The Grafana dashboard shipped in dist/ asks only for metrics the
    // daemons serve, in queries Prometheus accepts.
    let served: Vec<&str> = parent
        .keys()
        .chain(child.keys())
        .map(|name| name.split('{').next().unwrap())
        .collect();
    for query in dashboard_queries() {
        for metric in metric_names(&query) {
            assert!(
                served.contains(&metric.as_str()),
                "the dashboard's {query} asks for {metric}, which sfd does not serve"
            );
        }
        let query = query
            .replace("$__rate_interval", "1m")
            .replace("$job", ".*")
            .replace("$instance", ".*");
        if let Err(answer) = prometheus.accepts(h1, &query) {
            panic!("Prometheus refused the dashboard's {query}: {answer}");
        }
    }
    drop(prometheus);
    cluster.down().unwrap();
}

/// Without `[metrics] listen`, nothing listens: metrics are opt-in.
#[test]
fn metrics_are_off_unless_configured() {
    let (cluster, _dir) = cluster(1, 2, |_| {});
    let h1 = &cluster.hosts()[0];
    let output = in_netns(
        &h1.netns,
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &metrics_url(h1),
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "000",
        "nothing listens on the metrics port: {output:?}"
    );
    assert!(Path::new(&h1.socket).exists());
    cluster.down().unwrap();
}

/// Connections that never speak, 300 more every second and each held for 3 s, to `target`
/// from a thread in network namespace `netns`, until `stop`.
fn flood_half_open(
    netns: String,
    target: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        snowflock_testkit::enter_netns(&netns).unwrap();
        let mut opened = 0;
        let mut held = std::collections::VecDeque::new();
        let deadline = Instant::now() + Duration::from_secs(300);
        while !stop.load(std::sync::atomic::Ordering::Acquire) && Instant::now() < deadline {
            let batch: Vec<std::net::TcpStream> = (0..300)
                .filter_map(|_| {
                    std::net::TcpStream::connect_timeout(&target, Duration::from_millis(200)).ok()
                })
                .collect();
            opened += batch.len() as u64;
            held.push_back(batch);
            if held.len() > 3 {
                held.pop_front();
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        opened
    })
}

#[test]
fn a_flood_of_half_open_connections_does_not_stop_clones() {
    let (cluster, _dir) = cluster(2, 4, |spec| {
        spec.metrics_port = Some(METRICS_PORT);
        spec.mcdist.insert("distribution".into(), "unicast".into());
    });
    let hosts = cluster.hosts();
    let h1 = &hosts[0];
    // The flood comes from an address of the switch: not a member, not a clone host.
    let switch = cluster.switch_netns().to_string();
    let added = Command::new("ip")
        .args(["-n", &switch, "addr", "add", "10.77.0.250/24", "dev", "br0"])
        .status()
        .unwrap();
    assert!(added.success());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = flood_half_open(switch, h1.pages, stop.clone());
    std::thread::sleep(Duration::from_secs(1));

    let vm = start(
        &h1.socket,
        "seqsearch",
        256 << 20,
        "ref_mib=16 queries=4000 clones=6",
    );
    let ended = wait(&h1.socket, vm);
    stop.store(true, std::sync::atomic::Ordering::Release);
    let opened = flood.join().unwrap();
    assert_eq!(ended.outcome, VmOutcome::Exited(0), "{:#?}", ended.lines);
    assert_eq!(field(&ended.lines, "seqsearch: ref_mib", "check"), "ok");
    let report = &ended.reports[0];
    assert!(
        report
            .children
            .iter()
            .any(|c| c.host.as_deref() == Some("h2")),
        "a clone ran on h2, fetching over the flooded port: {report:?}"
    );
    assert!(opened >= 250, "the flood opened {opened} connections");
    let (_, text) = get(h1, &metrics_url(h1), None);
    let parent = samples(&text);
    assert!(
        sample(
            &parent,
            "snowflock_memory_server_refused_connections_total{limit=\"authenticating\"}"
        ) >= 250.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &parent,
            "snowflock_memory_server_refused_connections_total{limit=\"authenticated\"}"
        ),
        0.0
    );
    cluster.down().unwrap();
}
