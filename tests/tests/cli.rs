//! The `berth` binary's command line: bad input is refused with the field named and exit code 64,
//! before anything is loaded into the kernel.

use std::{path::PathBuf, process::Command};

fn berth() -> PathBuf {
    berth_tests::topo::berth_bin()
}

fn write(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("berth-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Runs `c` under `strace -f -e trace=bpf`: its output, and the bpf(2) commands it and its
/// children made (`BPF_PROG_LOAD`, `BPF_MAP_CREATE`, ...). Proof that a refused run touched no
/// BPF object: it holds whatever else runs on the machine meanwhile (`cargo xtask test` runs
/// the fixture suites beside this one), and it sees a load undone by the exit.
fn traced(c: &Command) -> (std::process::Output, Vec<String>) {
    let trace = std::env::temp_dir().join(format!(
        "berth-cli-{}-strace-{}",
        std::process::id(),
        TRACES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let mut t = Command::new("strace");
    t.args(["-f", "-qq", "-e", "trace=bpf", "-e", "signal=none", "-o"])
        .arg(&trace)
        .arg("--")
        .arg(c.get_program())
        .args(c.get_args());
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => t.env(k, v),
            None => t.env_remove(k),
        };
    }
    let out = t.output().expect("run strace (Debian package strace)");
    let calls = std::fs::read_to_string(&trace)
        .expect("strace's output")
        .lines()
        .filter_map(|l| l.split_once("bpf(").map(|(_, rest)| rest))
        .map(|rest| rest.split([',', ')']).next().unwrap_or("").to_owned())
        .collect();
    let _ = std::fs::remove_file(&trace);
    (out, calls)
}

static TRACES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// [`traced`] sees bpf(2) calls here, of a child of `timeout` as berth runs (`bpftool prog
/// show` makes some): without this, a trace that saw nothing would prove nothing.
fn assert_traced_sees_bpf() {
    let mut c = Command::new("timeout");
    c.args(["20", "bpftool", "prog", "show"]);
    let (out, calls) = traced(&c);
    assert!(out.status.success(), "bpftool prog show: {out:?}");
    assert!(
        calls.iter().any(|c| c.starts_with("BPF_")),
        "strace saw no bpf(2) call of `bpftool prog show`: {calls:?}"
    );
}

/// `berth` under `timeout 20`, for runs that must be refused: one that berth wrongly accepts
/// would otherwise serve until killed (`timeout` exits 124 then, which the callers' exit-code
/// assertions name).
fn bounded_berth() -> Command {
    let mut c = Command::new("timeout");
    c.arg("20").arg(berth());
    c
}

#[test]
fn bad_config_names_the_field_and_exits_64_without_loading_anything() {
    let cases = [
        (
            "weight.toml",
            "[[service]]\nname = \"w\"\nlisten = \"0.0.0.0:80\"\nbackends = [{ address = \"10.0.0.1:80\", weight = -1 }]\n",
            "service[0].backends (line 4)",
        ),
        (
            "type.toml",
            "[dataplane]\nmax_services = \"lots\"\n",
            "dataplane.max_services (line 2)",
        ),
        (
            "health-type.toml",
            "[[service]]\nname = \"a\"\nlisten = \"0.0.0.0:80\"\n[service.health]\ninterval_ms = \"fast\"\n",
            "service[0].health.interval_ms (line 5)",
        ),
        (
            "tiny-ct.toml",
            "[dataplane]\nconntrack_size = 1\n",
            "dataplane.conntrack_size",
        ),
        (
            "huge-table.toml",
            "[dataplane]\nmax_services = 4096\nmaglev_table_size = 1048573\n",
            "dataplane.max_services",
        ),
        (
            "port.toml",
            "[[service]]\nname = \"a\"\nlisten = \"0.0.0.0:80\"\nbackends = [\"10.0.0.1:99999\"]\n",
            "service[0].backends[0]",
        ),
        (
            "mode.toml",
            "[[service]]\nname = \"w\"\nlisten = \"0.0.0.0:80\"\nmode = \"nat\"\n",
            "service[0].mode (line 4)",
        ),
        (
            "snat-ports.toml",
            "[dataplane]\nsnat_ports = \"65000-64000\"\n",
            "dataplane.snat_ports (line 2)",
        ),
        (
            "snat-address.toml",
            "[dataplane]\nsnat_address = \"0.0.0.0\"\n",
            "dataplane.snat_address",
        ),
        (
            "pin.toml",
            "[dataplane]\npin_path = \"relative\"\n",
            "dataplane.pin_path",
        ),
        (
            "cgroup.toml",
            "[dataplane]\ncgroup = \"root\"\n",
            "dataplane.cgroup",
        ),
        (
            "listen.toml",
            "[[service]]\nname = \"w\"\nlisten = \"0.0.0.0\"\n",
            "service[0].listen",
        ),
        (
            "prime.toml",
            "[dataplane]\nmaglev_table_size = 1000\n",
            "dataplane.maglev_table_size",
        ),
        ("unknown.toml", "[dataplane]\nturbo = true\n", "turbo"),
        (
            "etcd-endpoint.toml",
            "[etcd]\nendpoints = [\"10.0.0.1:2379\"]\n[[service]]\nname = \"w\"\nlisten = \"0.0.0.0:80\"\netcd = { prefix = \"/w/\" }\n",
            "etcd.endpoints[0]",
        ),
        (
            // Valid as text; the file it names is read before the kernel is touched.
            "etcd-ca.toml",
            "[etcd]\nendpoints = [\"https://10.0.0.1:2379\"]\nca_file = \"/nonexistent/ca.pem\"\n[[service]]\nname = \"w\"\nlisten = \"0.0.0.0:80\"\netcd = { prefix = \"/w/\" }\n",
            "etcd.ca_file",
        ),
        (
            "etcd-prefix.toml",
            "[[service]]\nname = \"w\"\nlisten = \"0.0.0.0:80\"\netcd = { prefix = \"/w\" }\n",
            "service[0].etcd.prefix",
        ),
        (
            "engine-endpoint.toml",
            "[[docker.engine]]\nname = \"b\"\nendpoint = \"tcp://10.0.0.2\"\n",
            "docker.engine[0].endpoint",
        ),
        (
            "engine-field.toml",
            "[[docker.engine]]\nname = \"b\"\nendpoint = \"tcp://10.0.0.2:2376\"\ntls = true\n",
            "docker.engine[0].tls (line 4)",
        ),
        (
            "engine-verify.toml",
            "[[docker.engine]]\nname = \"c\"\nendpoint = \"tcp://10.0.0.3:2376\"\n\
             tls_cert = \"/etc/c/cert.pem\"\ntls_key = \"/etc/c/key.pem\"\n",
            "docker.engine[0].tls_ca",
        ),
        (
            // Read when berth prepares (and by check-config), before the kernel is touched.
            "engine-ca-file.toml",
            "[docker]\nenabled = true\n[[docker.engine]]\nname = \"c\"\n\
             endpoint = \"tcp://10.0.0.3:2376\"\ntls_ca = \"/nonexistent/ca.pem\"\n",
            "docker.engine[0].tls_ca: /nonexistent/ca.pem",
        ),
        (
            "engine-selector.toml",
            "[[service]]\nname = \"w\"\nlisten = \"0.0.0.0:80\"\n\
             docker = { image = \"w\", port = 80, engines = [\"nowhere\"] }\n",
            "service[0].docker.engines[0]",
        ),
        (
            "dup.toml",
            "[[service]]\nname = \"a\"\nlisten = \"0.0.0.0:80\"\n[[service]]\nname = \"b\"\nlisten = \"0.0.0.0:80\"\n",
            "service[1].listen",
        ),
        (
            "family.toml",
            "[[service]]\nname = \"v6\"\nlisten = \"[::]:8080\"\nbackends = [\"[fd00::2]:80\", \"10.0.0.2:80\"]\n",
            "service[0].backends[1]",
        ),
        (
            "family4.toml",
            "[[service]]\nname = \"v4\"\nlisten = \"0.0.0.0:8080\"\nbackends = [\"[fd00::2]:80\"]\n",
            "service[0].backends[0]",
        ),
        (
            // Full NAT's packets, from this host's own address, are martians to the stack:
            // with redirect = false nothing would reach the backends (5 of 5 TCP and UDP
            // requests failed when it was accepted).
            "fullnat-no-redirect.toml",
            "[dataplane]\nredirect = false\n[[service]]\nname = \"w\"\nlisten = \"0.0.0.0:80\"\nmode = \"fullnat\"\nbackends = [\"10.0.0.2:80\"]\n",
            "service[0].mode",
        ),
        (
            "snat6.toml",
            "[dataplane]\nsnat_address6 = \"192.0.2.7\"\n[[service]]\nname = \"v6\"\nlisten = \"[::]:8080\"\nmode = \"fullnat\"\nbackends = [\"[fd00::2]:80\"]\n",
            "dataplane.snat_address6",
        ),
    ];
    assert_traced_sees_bpf();
    for (file, text, field) in cases {
        let path = write(file, text);
        for args in [
            vec!["run", "--iface", "lo", "--cgroup", "none", "--config"],
            vec!["check-config"],
        ] {
            let mut c = bounded_berth();
            c.args(&args).arg(&path);
            let (out, calls) = traced(&c);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{file} {args:?}: {stderr}");
            assert!(
                stderr.contains(field),
                "{file}: error must name {field:?}: {stderr}"
            );
            assert!(
                calls.is_empty(),
                "{file} {args:?}: a refused config must not touch BPF: {calls:?}"
            );
        }
    }
    // `berth publish` refuses the same way, before writing anything; its Docker Engines are
    // the daemon's (`[[docker.engine]]`, else DOCKER_HOST), checked alike.
    let service = "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n\
                   [[publish.service]]\nprefix = \"/w/\"\nimage = \"x\"\nport = 80\n";
    let engine_tls = format!(
        "{service}[[docker.engine]]\nname = \"b\"\nendpoint = \"tcp://10.0.0.12:2376\"\n\
         tls_ca = \"/nonexistent/ca.pem\"\n"
    );
    let engine_ssh =
        format!("{service}[[docker.engine]]\nname = \"b\"\nendpoint = \"ssh://me@b\"\n");
    for (file, text, env, field) in [
        (
            "publish-engine-tls.toml",
            engine_tls.as_str(),
            None,
            "docker.engine[0].tls_ca",
        ),
        (
            "publish-engine-ssh.toml",
            engine_ssh.as_str(),
            None,
            "docker.engine[0].endpoint",
        ),
        (
            "publish-docker-host.toml",
            service,
            Some("ssh://me@host"),
            "DOCKER_HOST",
        ),
    ] {
        let mut cmd = Command::new(berth());
        cmd.args(["publish", "--config"]).arg(write(file, text));
        if let Some(h) = env {
            cmd.env("DOCKER_HOST", h);
        }
        let out = cmd.output().expect("run berth publish");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{file}: {stderr}");
        assert!(
            stderr.contains(field),
            "{file}: must name {field:?}: {stderr}"
        );
    }
    for (file, text, field) in [
        (
            "publish-none.toml",
            "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n",
            "publish.service",
        ),
        (
            "publish-ca.toml",
            "[etcd]\nendpoints = [\"https://127.0.0.1:2379\"]\nca_file = \"/nonexistent/ca.pem\"\n\
             [[publish.service]]\nprefix = \"/w/\"\nimage = \"x\"\nport = 80\n",
            "etcd.ca_file",
        ),
        (
            "publish-port.toml",
            "[[publish.service]]\nprefix = \"/w/\"\nimage = \"x\"\nport = 0\n",
            "publish.service[0].port",
        ),
    ] {
        let out = Command::new(berth())
            .args(["publish", "--config"])
            .arg(write(file, text))
            .output()
            .expect("run berth publish");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{file}: {stderr}");
        assert!(
            stderr.contains(field),
            "{file}: must name {field:?}: {stderr}"
        );
    }
}

/// Without a config file (or engines in it), the docker CLI's environment names the engine;
/// one berth cannot use is refused like a bad config.
#[test]
fn an_unusable_docker_environment_names_the_variable_and_exits_64() {
    assert_traced_sees_bpf();
    for (env, field) in [
        (vec![("DOCKER_HOST", "ssh://me@host")], "DOCKER_HOST"),
        (
            vec![
                ("DOCKER_HOST", "tcp://10.0.0.9"),
                ("DOCKER_TLS_VERIFY", "1"),
                ("DOCKER_CERT_PATH", "/nonexistent"),
            ],
            "DOCKER_CERT_PATH",
        ),
    ] {
        let mut c = bounded_berth();
        c.args(["run", "--iface", "lo", "--cgroup", "none"])
            .envs(env.iter().copied());
        let (out, calls) = traced(&c);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{env:?}: {stderr}");
        assert!(stderr.contains(field), "{env:?}: {stderr}");
        assert!(calls.is_empty(), "{env:?}: touched BPF: {calls:?}");
    }
}

#[test]
fn missing_config_file_and_interface_are_reported() {
    let out = bounded_berth()
        .args(["run", "--config", "/nonexistent/berth.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/berth.toml"));
    let ok = write(
        "ok.toml",
        "[[service]]\nname = \"w\"\nlisten = \"0.0.0.0:80\"\n",
    );
    let out = bounded_berth()
        .args(["run", "--iface", "nosuchif0", "--config"])
        .arg(&ok)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nosuchif0"),
        "{out:?}"
    );
}

#[test]
fn check_config_prints_what_would_be_served() {
    let p = write(
        "good.toml",
        "[[service]]\nname = \"web\"\nlisten = \"0.0.0.0:8080\"\nbackends = [\"10.0.0.2:8000\", { address = \"10.0.0.3:8000\", weight = 2 }]\n",
    );
    let out = Command::new(berth())
        .arg("check-config")
        .arg(&p)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("web tcp 0.0.0.0:8080 -> 2 backends"), "{s}");
    let p = write(
        "good6.toml",
        "[[service]]\nname = \"web\"\nlisten = \"0.0.0.0:8080\"\nlisten6 = \"[::]:8080\"\n\
         backends = [\"10.0.0.2:8000\", \"[fd00::2]:8000\", \"[fd00::3]:8000\"]\n\
         [[service]]\nname = \"dns6\"\nlisten = \"[2001:db8::1]:53\"\nprotocol = \"udp\"\n\
         backends = [\"[fd00::5]:53\"]\n",
    );
    let out = Command::new(berth())
        .arg("check-config")
        .arg(&p)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let s = String::from_utf8_lossy(&out.stdout);
    for line in [
        "web tcp 0.0.0.0:8080 -> 1 backends",
        "web.ipv6 tcp [::]:8080 -> 2 backends",
        "dns6 udp [2001:db8::1]:53 -> 1 backends",
    ] {
        assert!(s.contains(line), "{line:?} in {s}");
    }
    let p = write(
        "engines.toml",
        "[[docker.engine]]\nname = \"a\"\nendpoint = \"unix:///var/run/docker.sock\"\n\
         [[docker.engine]]\nname = \"b\"\nendpoint = \"tcp://10.0.0.2:2375\"\n\
         [[service]]\nname = \"web\"\nlisten = \"0.0.0.0:8080\"\n\
         docker = { image = \"web\", port = 8000 }\n",
    );
    let out = Command::new(berth())
        .arg("check-config")
        .arg(&p)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let s = String::from_utf8_lossy(&out.stdout);
    for line in [
        "docker engine a: unix:///var/run/docker.sock",
        "docker engine b: tcp://10.0.0.2:2375",
    ] {
        assert!(s.contains(line), "{s}");
    }
}

/// A network namespace deleted on drop, with the processes started in it killed first.
struct Ns(String, Vec<std::process::Child>);

impl Drop for Ns {
    fn drop(&mut self) {
        for c in &mut self.1 {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn second_berth_on_the_same_interface_is_refused() {
    let name = format!("btcli{}", std::process::id());
    let _ = Command::new("ip")
        .args(["netns", "del", &name])
        .stderr(std::process::Stdio::null())
        .status();
    assert!(
        Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success()
    );
    let mut ns = Ns(name.clone(), Vec::new());
    let cfg = write(
        "one.toml",
        // Metrics off: both daemons share the namespace's loopback, and the interface is the
        // point here.
        "[dataplane]\nredirect = false\n[metrics]\nenabled = false\n[[service]]\nname = \"w\"\nlisten = \"127.0.0.1:80\"\n",
    );
    let log = std::env::temp_dir().join(format!("berth-cli-{}/first.log", std::process::id()));
    let first = Command::new("ip")
        .args(["netns", "exec", &name])
        .arg(berth())
        .args(["run", "--iface", "lo", "--cgroup", "none", "--admin-socket"])
        .arg(log.with_extension("sock"))
        .arg("--config")
        .arg(&cfg)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    ns.1.push(first);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("berth ready")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "first berth not ready: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let second = Command::new("ip")
        .args(["netns", "exec", &name, "timeout", "20"])
        .arg(berth())
        .args(["run", "--iface", "lo", "--cgroup", "none", "--admin-socket"])
        .arg(log.with_extension("2.sock"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("already attached to lo"), "{stderr}");
}

#[test]
fn down_leaves_a_directory_that_is_not_bpffs_untouched() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = std::env::temp_dir().join(format!("berth-cli-{}/not-bpffs", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(berth())
        .args(["down", "--pin-path"])
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("is not on a BPF filesystem"), "{stderr}");
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o755, "berth down changed {}", dir.display());
}

#[test]
fn a_huge_field_value_is_not_echoed_whole() {
    let huge = "a".repeat(2 << 20);
    for (file, text, field) in [
        (
            "huge-listen.toml",
            format!("[[service]]\nname = \"w\"\nlisten = \"{huge}\"\n"),
            "service[0].listen",
        ),
        (
            "huge-type.toml",
            format!("[dataplane]\nmax_services = \"{huge}\"\n"),
            "dataplane.max_services (line 2)",
        ),
        (
            "huge-key.toml",
            format!("[dataplane]\n{huge} = 1\n"),
            "dataplane.aaaa",
        ),
    ] {
        let path = write(file, &text);
        let out = Command::new(berth())
            .arg("check-config")
            .arg(&path)
            .output()
            .expect("run berth");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{file}");
        assert!(
            stderr.len() < 1024,
            "{file}: {} bytes of error: {}...",
            stderr.len(),
            &stderr[..300.min(stderr.len())]
        );
        println!("{file}: {stderr}");
        assert!(stderr.contains(field), "{file}: {stderr}");
        assert!(
            stderr.contains(&format!("{}…", "a".repeat(20)))
                && stderr.contains(&format!("({} bytes)", huge.len())),
            "{file}: the value is shown cut, with its length: {stderr}"
        );
    }
}

/// `berth ARGS`: (exit status, stdout, stderr).
fn berth_output(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let out = Command::new(berth())
        .args(args)
        .output()
        .expect("run berth");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version_names_the_git_revision_it_was_built_from() {
    let (st, out, err) = berth_output(&["--version"]);
    assert!(st.success(), "{err}");
    // The checkout the tests run in is the one berth was built from (`cargo xtask test` builds
    // both); outside a git checkout the build script writes "unknown".
    let rev = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".to_owned(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        );
    assert_eq!(
        out.trim(),
        format!("berth {} (git {rev})", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn completions_load_in_bash_and_complete_subcommands_and_flags() {
    for (shell, marker) in [
        ("bash", "complete -F _berth"),
        ("zsh", "#compdef berth"),
        ("fish", "complete -c berth"),
    ] {
        let (st, out, err) = berth_output(&["completions", shell]);
        assert!(st.success(), "{shell}: {err}");
        assert!(out.contains(marker), "{shell}: no {marker:?}");
        for word in ["check-config", "status", "down", "completions", "pin-path"] {
            assert!(out.contains(word), "{shell}: {word} missing");
        }
    }
    let (st, _, err) = berth_output(&["completions", "tcsh"]);
    assert!(!st.success(), "an unknown shell is refused");
    assert!(err.contains("possible values"), "{err}");
    // bash sources the script, and its function completes a subcommand and a flag of `run`.
    let script = write("berth.bash", &berth_output(&["completions", "bash"]).1);
    for (words, cword, want) in [
        ("berth ch", 1, "check-config"),
        ("berth run --pin", 2, "--pin-path"),
    ] {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {}; COMP_WORDS=({words}); COMP_CWORD={cword}; \
                 _berth berth \"${{COMP_WORDS[$COMP_CWORD]}}\" \"${{COMP_WORDS[$COMP_CWORD-1]}}\"; \
                 echo \"${{COMPREPLY[@]}}\"",
                script.display()
            ))
            .output()
            .expect("bash");
        let got = String::from_utf8_lossy(&out.stdout);
        assert_eq!(got.trim(), want, "completing {words:?}: {got:?}");
    }
}

/// The unit file in the repository (dist/berth.service).
fn unit_file() -> (PathBuf, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dist/berth.service");
    let text = std::fs::read_to_string(&path).expect("dist/berth.service");
    (path, text)
}

#[test]
fn systemd_unit_verifies_and_starts_berth_with_flags_it_accepts() {
    let (_, unit) = unit_file();
    let value = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in the unit"))
            .to_owned()
    };
    let exec = value("ExecStart");
    let argv: Vec<&str> = exec.split_whitespace().collect();
    // Where the image and the README install it.
    assert_eq!(argv[0], "/usr/local/bin/berth", "{exec}");
    assert_eq!(argv[1], "run", "{exec}");
    // Every flag is one `berth run` accepts: clap refuses an unknown one before `--help`.
    let (st, out, err) = berth_output(&[&argv[1..], &["--help"]].concat());
    assert!(
        st.success(),
        "`berth {}` refused: {err}",
        argv[1..].join(" ")
    );
    for flag in argv[2..].iter().filter(|a| a.starts_with("--")) {
        assert!(out.contains(flag), "{flag} not in `berth run --help`");
    }
    assert_eq!(
        value("RestartPreventExitStatus"),
        "64",
        "bad config: no restart loop"
    );
    assert_eq!(
        value("KillSignal"),
        "SIGTERM",
        "leaves the pinned dataplane serving"
    );
    assert_eq!(
        value("CapabilityBoundingSet"),
        "CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_SYS_ADMIN",
        "the set the README names"
    );
    // systemd's own check, on a copy whose ExecStart points at the binary under test (this
    // machine has none at /usr/local/bin). It exits 0 on warnings too: those must not appear.
    let copy = write(
        "berth.service",
        &unit.replace("/usr/local/bin/berth", &berth().display().to_string()),
    );
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze (Debian's systemd package)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify: {err}"
    );
}

/// Synapse mode has no `[metrics]` of its own: with berth's default metrics port taken it could
/// not start at all; `--metrics-listen` moves the port in every mode.
#[test]
fn synapse_mode_moves_the_metrics_port_with_a_flag() {
    use berth_tests::topo::{Netns, test_pin_path};
    let ns = Netns::new("clim");
    let _squatter = ns.run(|| std::net::TcpListener::bind("127.0.0.1:9477").expect("bind 9477"));
    let synapse = write(
        "metrics.synapse.json",
        r#"{"services": {"web": {"discovery": {"method": "docker", "container_port": 8000,
            "image_name": "berth-test/none"}, "haproxy": {"port": 8080}}}}"#,
    );
    let pins = test_pin_path("clim");
    let start = |extra: &[&str], tag: &str| {
        let log = write(&format!("{tag}.log"), "");
        let child = ns
            .command(berth())
            .args([
                "run",
                "--iface",
                "lo",
                "--cgroup",
                "none",
                "--detach-on-exit",
            ])
            .arg("--synapse-config")
            .arg(&synapse)
            .arg("--pin-path")
            .arg(&pins)
            .arg("--admin-socket")
            .arg(log.with_extension("sock"))
            .args(extra)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        (child, log)
    };
    // Without the flag: refused, naming the port in use, before the kernel is touched.
    let (mut child, log) = start(&[], "nometrics");
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{text}");
    assert!(text.contains("127.0.0.1:9477"), "{text}");
    assert!(!pins.exists(), "refused, yet pinned");
    // With it: serves, metrics on the port asked for.
    let (mut child, log) = start(&["--metrics-listen", "127.0.0.1:19477"], "metrics");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("berth ready")
    {
        assert!(
            std::time::Instant::now() < deadline && child.try_wait().unwrap().is_none(),
            "berth not ready: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let page = ns
        .command("curl")
        .args(["-sf", "http://127.0.0.1:19477/metrics"])
        .output()
        .unwrap();
    let page = String::from_utf8_lossy(&page.stdout);
    assert!(page.contains("berth_"), "{page}");
    // SAFETY: a plain signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert!(!pins.exists(), "--detach-on-exit left pins");
}

/// A Synapse (JSON) file given where berth's TOML is expected is named as such, with the flag
/// to use, instead of "line 1: invalid key"; and `berth status` says how to reach a daemon
/// started with another admin socket (the flag or BERTH_ADMIN_SOCKET).
#[test]
fn json_without_the_synapse_flag_and_a_missing_admin_socket_say_what_to_do() {
    let json = write(
        "looks.json",
        r#"{"services": {"web": {"discovery": {"method": "docker", "container_port": 8000,
            "image_name": "x"}, "haproxy": {"port": 8080}}}}"#,
    );
    let out = Command::new(berth())
        .args(["check-config"])
        .arg(&json)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("check-config --synapse"), "{err}");
    let ok = Command::new(berth())
        .args(["check-config", "--synapse"])
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let sock = write("nobody.sock", "").with_extension("absent");
    let out = Command::new(berth())
        .args(["status"])
        .env("BERTH_ADMIN_SOCKET", &sock)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&sock.display().to_string()),
        "the socket tried: {err}"
    );
    assert!(err.contains("--admin-socket PATH"), "{err}");
}
