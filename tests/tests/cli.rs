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

/// Names of loaded BPF programs (to prove a refused config loaded nothing).
fn loaded_berth_programs() -> usize {
    let out = Command::new("bpftool")
        .args(["prog", "show"])
        .output()
        .expect("bpftool");
    String::from_utf8_lossy(&out.stdout)
        .matches("berth_tc_ingre")
        .count()
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
            "dup.toml",
            "[[service]]\nname = \"a\"\nlisten = \"0.0.0.0:80\"\n[[service]]\nname = \"b\"\nlisten = \"0.0.0.0:80\"\n",
            "service[1].listen",
        ),
    ];
    let before = loaded_berth_programs();
    for (file, text, field) in cases {
        let path = write(file, text);
        for args in [
            vec!["run", "--iface", "lo", "--cgroup", "none", "--config"],
            vec!["check-config"],
        ] {
            let out = Command::new(berth())
                .args(&args)
                .arg(&path)
                .output()
                .expect("run berth");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{file} {args:?}: {stderr}");
            assert!(
                stderr.contains(field),
                "{file}: error must name {field:?}: {stderr}"
            );
        }
    }
    assert_eq!(
        loaded_berth_programs(),
        before,
        "a refused config must not load programs"
    );
}

#[test]
fn missing_config_file_and_interface_are_reported() {
    let out = Command::new(berth())
        .args(["run", "--config", "/nonexistent/berth.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/berth.toml"));
    let ok = write(
        "ok.toml",
        "[[service]]\nname = \"w\"\nlisten = \"0.0.0.0:80\"\n",
    );
    let out = Command::new(berth())
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
        .args(["netns", "exec", &name])
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
