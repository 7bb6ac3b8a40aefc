//! Compiles the switch's packet-mangling program (`src/mangle.bpf.c`) with clang into
//! `OUT_DIR/mangle.bpf.o`, which the crate embeds.

use std::env;
use std::io::ErrorKind;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

/// The compiler: Debian's versioned clang, the one the project is tested with.
const CLANG: &str = "clang-19";
const SOURCE: &str = "src/mangle.bpf.c";

fn main() -> ExitCode {
    println!("cargo:rerun-if-changed={SOURCE}");
    match compile() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn compile() -> Result<(), String> {
    let out_dir = env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?;
    let object = PathBuf::from(out_dir).join("mangle.bpf.o");
    let arch = env::var("CARGO_CFG_TARGET_ARCH").map_err(|e| format!("target arch: {e}"))?;
    // `<linux/...>` headers include `<asm/types.h>`, in Debian's multiarch directory.
    let multiarch_include = format!("-I/usr/include/{arch}-linux-gnu");
    let output = Command::new(CLANG)
        // `-g` emits BTF, without which aya refuses the object.
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(multiarch_include)
        .args(["-c", SOURCE, "-o"])
        .arg(&object)
        .output()
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound => format!(
                "`{CLANG}` was not found; the switch's mangling program needs the Debian packages \
                 clang-19 and libbpf-dev (scripts/deps.sh installs them)"
            ),
            _ => format!("could not run `{CLANG}`: {e}"),
        })?;
    if !output.status.success() {
        return Err(format!(
            "`{CLANG}` failed to compile {SOURCE} ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}
