//! A real Garage cluster (the S3-compatible distributed store) on loopback: three processes,
//! three data directories, replication factor 3, the layout applied, one bucket and one key
//! allowed on it. Nodes can be killed and restarted one by one. `scripts/test` installs
//! `garage` with cargo when it is missing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The `garage` binary: on the PATH or in cargo's bin directory.
pub fn garage_bin() -> Option<PathBuf> {
    if crate::have("garage") {
        return Some(PathBuf::from("garage"));
    }
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let bin = home.join("bin/garage");
    bin.exists().then_some(bin)
}

struct Node {
    config: PathBuf,
    s3: SocketAddr,
    log: PathBuf,
    child: Option<Child>,
}

/// A running cluster; every node is killed on drop.
pub struct Garage {
    bin: PathBuf,
    nodes: Vec<Node>,
    /// The bucket made for the test.
    pub bucket: String,
    /// The key allowed on it.
    pub key_id: String,
    /// Its secret.
    pub secret: String,
    key_name: String,
    _dir: tempfile::TempDir,
}

fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Garage {
    /// Starts `n` nodes and forms the cluster (replication factor `n`, one zone each).
    pub fn start(n: usize) -> Garage {
        let bin = garage_bin().expect("garage is required (scripts/test installs it)");
        let dir = tempfile::tempdir().unwrap();
        let secret = random_hex(32);
        let mut nodes = Vec::new();
        for i in 0..n {
            let d = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&d).unwrap();
            let (rpc, s3, admin) = (crate::free_addr(), crate::free_addr(), crate::free_addr());
            let config = d.join("garage.toml");
            std::fs::write(
                &config,
                format!(
                    "bootstrap_peers = []\nmetadata_dir = \"{m}\"\ndata_dir = \"{data}\"\ndb_engine = \"sqlite\"\n\
                     replication_factor = {n}\nrpc_bind_addr = \"{rpc}\"\nrpc_public_addr = \"{rpc}\"\n\
                     rpc_secret = \"{secret}\"\n[s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"{s3}\"\n\
                     root_domain = \".s3.garage\"\n[admin]\napi_bind_addr = \"{admin}\"\n",
                    m = d.join("meta").display(),
                    data = d.join("data").display(),
                ),
            )
            .unwrap();
            nodes.push(Node {
                config,
                s3,
                log: d.join("garage.log"),
                child: None,
            });
        }
        let mut g = Garage {
            bin,
            nodes,
            bucket: "archive".into(),
            key_id: String::new(),
            secret: String::new(),
            key_name: "spoold".into(),
            _dir: dir,
        };
        for i in 0..n {
            g.start_node(i);
        }
        let ids: Vec<String> = (0..n)
            .map(|i| {
                let mut id = String::new();
                assert!(
                    crate::wait_until(20, || {
                        id = g.cli_on(i, &["node", "id", "-q"]).unwrap_or_default();
                        id.contains('@')
                    }),
                    "garage node {i} did not start: {}",
                    g.log(i)
                );
                id.trim().to_string()
            })
            .collect();
        for id in &ids[1..] {
            g.cli(&["node", "connect", id]);
        }
        // A node restarted after the whole cluster went down finds the others through these.
        let peers = format!(
            "bootstrap_peers = [{}]",
            ids.iter()
                .map(|id| format!("\"{id}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for node in &g.nodes {
            let text = std::fs::read_to_string(&node.config).unwrap();
            std::fs::write(&node.config, text.replace("bootstrap_peers = []", &peers)).unwrap();
        }
        for (i, id) in ids.iter().enumerate() {
            let short = id.split('@').next().unwrap_or("");
            let zone = format!("dc{i}");
            g.cli(&["layout", "assign", "-z", &zone, "-c", "1G", short]);
        }
        g.cli(&["layout", "apply", "--version", "1"]);
        g.cli(&["bucket", "create", "archive"]);
        let key = g.cli(&["key", "create", "spoold"]);
        let field = |name: &str| {
            key.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("no {name} in {key}"))
        };
        g.key_id = field("Key ID:");
        g.secret = field("Secret key:");
        g.allow(true);
        g
    }

    fn start_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap();
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&node.config)
            .arg("server")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        node.child = Some(child);
        let s3 = node.s3;
        assert!(
            crate::wait_until(20, || std::net::TcpStream::connect(s3).is_ok()),
            "garage node {i} does not listen"
        );
    }

    /// Restarts node `i` on its data.
    pub fn restart(&mut self, i: usize) {
        assert!(self.nodes[i].child.is_none(), "node {i} is running");
        self.start_node(i);
    }

    /// Kills node `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The S3 endpoint of node `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://{}", self.nodes[i].s3)
    }

    /// `garage status` and the end of every node's log, for a failing test's message.
    pub fn diagnose(&self) -> String {
        let status = (0..self.nodes.len())
            .find(|&i| self.nodes[i].child.is_some())
            .and_then(|i| self.cli_on(i, &["status"]))
            .unwrap_or_default();
        let mut out = format!("--- garage status:\n{status}");
        for i in 0..self.nodes.len() {
            let log = self.log(i);
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            out.push_str(&format!("\n--- garage node {i}:\n"));
            for l in tail.iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    fn cli_on(&self, i: usize, args: &[&str]) -> Option<String> {
        let out = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.nodes[i].config)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs the garage CLI on the first running node; panics on failure.
    pub fn cli(&self, args: &[&str]) -> String {
        let i = (0..self.nodes.len())
            .find(|&i| self.nodes[i].child.is_some())
            .expect("no garage node running");
        for _ in 0..20 {
            if let Some(out) = self.cli_on(i, args) {
                return out;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("garage {args:?} failed:\n{}", self.log(i));
    }

    /// Allows (or denies) the test's key on the bucket.
    pub fn allow(&self, allowed: bool) {
        let verb = if allowed { "allow" } else { "deny" };
        self.cli(&[
            "bucket",
            verb,
            "--read",
            "--write",
            "--owner",
            &self.bucket,
            "--key",
            &self.key_name,
        ]);
    }

    /// Objects in the bucket, as Garage counts them.
    pub fn objects(&self) -> u64 {
        let info = self.cli(&["bucket", "info", &self.bucket]);
        info.lines()
            .find_map(|l| l.trim().strip_prefix("Objects:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no object count in {info}"))
    }

    /// Every object under `prefix`, name and bytes, as the store holds them.
    pub fn objects_under(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        let remote = archive::remote::Remote::new(&archive::ObjectStoreConfig {
            endpoints: vec![self.endpoint(0)],
            bucket: self.bucket.clone(),
            region: "garage".into(),
            prefix: prefix.into(),
            access_key_id: self.key_id.clone(),
            secret_access_key: self.secret.clone(),
        })
        .unwrap();
        remote.every_object().unwrap()
    }

    /// An `[archive.object_store]` section for node `i`, its secret written to `dir`.
    pub fn archive_config(&self, i: usize, prefix: &str, dir: &Path) -> String {
        let secret = dir.join("s3.secret");
        std::fs::write(&secret, &self.secret).unwrap();
        format!(
            "[archive.object_store]\nendpoint = \"{}\"\nbucket = \"{}\"\nregion = \"garage\"\nprefix = \"{prefix}\"\n\
             access_key_id = \"{}\"\nsecret_access_key_file = \"{}\"\n",
            self.endpoint(i),
            self.bucket,
            self.key_id,
            secret.display()
        )
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
