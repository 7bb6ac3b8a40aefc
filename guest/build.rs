//! Guest builds (`rt`): link the examples as flock images with guest.ld.
//! Host builds (`images`): build the example guests with a nested cargo and
//! gcc, and embed them (`$OUT_DIR/images.rs`, included by `mod images`).

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let script = dir.join("guest.ld");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed={}", script.display());
    if env::var_os("CARGO_FEATURE_RT").is_some() {
        for arg in link_args(&script) {
            println!("cargo::rustc-link-arg-examples={arg}");
        }
    }
    if env::var_os("CARGO_FEATURE_IMAGES").is_some() {
        build_images(&dir, &script);
    }
}

/// Linker flags (for gcc as the driver) that make a flock image: static,
/// not PIE, no C runtime, laid out by guest.ld.
fn link_args(script: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-z,norelro",
        "-Wl,-z,max-page-size=4096",
        "-Wl,--no-eh-frame-hdr",
    ]
    .map(String::from)
    .into();
    args.push(format!("-Wl,-T,{}", script.display()));
    args
}

fn build_images(dir: &Path, script: &Path) {
    for input in [
        "Cargo.toml",
        "Cargo.lock",
        ".cargo/config.toml",
        "src",
        "examples",
        "include",
        "c",
        "fortran",
        "linux/Cargo.toml",
        "linux/build.rs",
        "linux/linux.ld",
        "linux/src",
        "rust-std/Cargo.toml",
        "rust-std/src",
    ] {
        println!("cargo::rerun-if-changed={}", dir.join(input).display());
    }
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let target_dir = out.join("guest-target");

    // The nested build runs in guest/ so guest/.cargo/config.toml applies, and
    // must not inherit the outer build's configuration: drop every variable
    // cargo sets for build scripts or reads itself, except CARGO_HOME (where
    // the registry lives) and RUSTC (the compiler of the outer build, so both
    // use one toolchain).
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut nested = Command::new(cargo);
    nested
        .current_dir(dir)
        .args([
            "build",
            "--release",
            "--examples",
            "--features",
            "rt",
            "--offline",
        ])
        .arg("--manifest-path")
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let leaks = (key.starts_with("CARGO") && key != "CARGO_HOME")
            || key.starts_with("__CARGO")
            || key.starts_with("DEP_")
            || key.starts_with("RUSTC_")
            || matches!(
                key,
                "RUSTFLAGS"
                    | "RUSTDOC"
                    | "RUSTDOCFLAGS"
                    | "OUT_DIR"
                    | "TARGET"
                    | "HOST"
                    | "NUM_JOBS"
                    | "OPT_LEVEL"
                    | "DEBUG"
                    | "PROFILE"
            );
        if leaks {
            nested.env_remove(key);
        }
    }
    run(&mut nested, "nested cargo build of the guest examples");
    // The personality is built without `rt`: it has an entry and allocator of its own.
    let mut personality = Command::new(nested.get_program());
    personality
        .current_dir(dir)
        .args(["build", "--release", "--offline", "-p", "snowflock-linux"])
        .arg("--manifest-path")
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    for (key, value) in nested.get_envs() {
        match value {
            Some(value) => personality.env(key, value),
            None => personality.env_remove(key),
        };
    }
    run(
        &mut personality,
        "nested cargo build of the Linux personality",
    );
    // The Rust std example: a static Linux program (crt-static), in a target
    // directory of its own since its flags differ from the guests'.
    let std_target = out.join("std-target");
    let mut std_example = Command::new(nested.get_program());
    std_example
        .current_dir(dir)
        .args([
            "build",
            "--release",
            "--offline",
            "-p",
            "snowflock-std-example",
        ])
        .arg("--manifest-path")
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&std_target);
    for (key, value) in nested.get_envs() {
        match value {
            Some(value) => std_example.env(key, value),
            None => std_example.env_remove(key),
        };
    }
    std_example.env(
        "RUSTFLAGS",
        "-C relocation-model=static -C target-cpu=x86-64-v2 -C target-feature=+crt-static",
    );
    run(
        &mut std_example,
        "nested cargo build of the Rust std example",
    );

    let release = target_dir.join("release").join("examples");
    let mut images: Vec<(String, PathBuf)> = stems(&dir.join("examples"), "rs")
        .into_iter()
        .map(|name| {
            let path = release.join(&name);
            (name, path)
        })
        .collect();

    let primes = out.join("primes_c");
    let mut gcc = Command::new("gcc");
    gcc.args([
        "-O2",
        "-std=c11",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-ffreestanding",
        "-fno-pie",
    ])
    .args([
        "-fno-stack-protector",
        "-fno-asynchronous-unwind-tables",
        "-fno-builtin",
    ])
    .arg("-I")
    .arg(dir.join("include"))
    .arg(dir.join("c").join("primes.c"))
    .args(link_args(script))
    .arg("-o")
    .arg(&primes);
    run(&mut gcc, "gcc of c/primes.c");
    images.push(("primes_c".into(), primes));

    // Linux-ABI examples: ordinary C programs, linked static against glibc.
    for name in stems(&dir.join("c").join("linux"), "c") {
        let program = out.join(&name);
        let mut gcc = Command::new("gcc");
        gcc.args([
            "-O2",
            "-std=gnu11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-static",
        ])
        .arg("-I")
        .arg(dir.join("include"))
        .arg(dir.join("c").join("linux").join(format!("{name}.c")))
        .arg("-o")
        .arg(&program);
        run(&mut gcc, &format!("gcc -static of c/linux/{name}.c"));
        images.push((name, program));
    }

    images.push((
        "clonestd".into(),
        std_target.join("release").join("clonestd"),
    ));

    // The Fortran example, with the C shim that gives it the clone API.
    let fortran = dir.join("fortran");
    let pisum = out.join("pisum_f");
    let mut gfortran = Command::new("gfortran");
    gfortran
        .args(["-O2", "-static", "-Wall", "-Werror", "-I"])
        .arg(dir.join("include"))
        .arg(fortran.join("pisum.f90"))
        .arg(fortran.join("snowflock_f.c"))
        .arg("-J")
        .arg(&out)
        .arg("-o")
        .arg(&pisum);
    run(&mut gfortran, "gfortran -static of fortran/pisum.f90");
    images.push(("pisum_f".into(), pisum));

    let mut code = String::from("// Generated by build.rs: the example guests as flock images.\n");
    for (name, path) in &images {
        assert!(path.is_file(), "missing guest image {}", path.display());
        writeln!(
            code,
            "/// The `{name}` guest.\npub const {}: &[u8] = include_bytes!({:?});",
            name.to_uppercase(),
            path.display().to_string()
        )
        .unwrap();
    }
    let personality = target_dir.join("release").join("sf-linux");
    assert!(personality.is_file(), "missing {}", personality.display());
    writeln!(
        code,
        "/// The Linux personality (`snowflock-linux`), loaded next to a Linux-ABI program.\npub const LINUX_PERSONALITY: &[u8] = include_bytes!({:?});",
        personality.display().to_string()
    )
    .unwrap();
    code.push_str("/// Every guest image by name.\npub const ALL: &[(&str, &[u8])] = &[\n");
    for (name, _) in &images {
        writeln!(code, "    ({name:?}, {}),", name.to_uppercase()).unwrap();
    }
    code.push_str("];\n");
    fs::write(out.join("images.rs"), code).expect("write images.rs");
}

/// Stems of the files in `dir` whose extension is `ext`, sorted.
fn stems(dir: &Path, ext: &str) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            (path.extension()? == ext).then(|| path.file_stem()?.to_str().map(String::from))?
        })
        .collect();
    names.sort();
    names
}

fn run(cmd: &mut Command, what: &str) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(
        status.success(),
        "{what} failed ({status}); see the output above"
    );
}
