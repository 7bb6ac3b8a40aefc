//! `sf completions`, `sf man` and `dist/install-shell-files.sh`, run as a
//! user or a packager would: the scripts load in their shell, the pages render.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SF: &str = env!("CARGO_BIN_EXE_sf");
const SUBCOMMANDS: [&str; 3] = ["run", "cluster", "descriptor"];

fn sf(args: &[&str]) -> Output {
    Command::new(SF).args(args).output().expect("sf runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Stdout of a command that must succeed.
fn stdout_of(out: Output) -> String {
    assert!(
        out.status.success(),
        "{:?}\n{}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn install_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/install-shell-files.sh")
}

/// The words bash's completion, loaded from `script`, offers for the next
/// word after `words`.
fn bash_completes(script: &Path, words: &[&str]) -> Vec<String> {
    let words = words.join(" ");
    let out = Command::new("bash")
        .args([
            "-c",
            r#"source "$1"
               read -ra COMP_WORDS <<< "$2"
               COMP_WORDS+=("")
               COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
               _sf sf "" "${COMP_WORDS[COMP_CWORD - 1]}"
               printf '%s\n' "${COMPREPLY[@]}""#,
            "bash",
        ])
        .arg(script)
        .arg(words)
        .output()
        .expect("bash runs");
    stdout_of(out).lines().map(str::to_owned).collect()
}

#[test]
fn the_bash_script_parses_registers_sf_and_completes_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("sf.bash");
    std::fs::write(&script, stdout_of(sf(&["completions", "bash"]))).unwrap();

    let parse = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(parse.status.success(), "{}", text(&parse.stderr));

    let registered = Command::new("bash")
        .args(["-c", r#"source "$1" && complete -p sf"#, "bash"])
        .arg(&script)
        .output()
        .unwrap();
    let registered = stdout_of(registered);
    assert!(
        registered.contains("-F _sf") && registered.trim_end().ends_with(" sf"),
        "{registered}"
    );

    let top = bash_completes(&script, &["sf"]);
    for name in SUBCOMMANDS.iter().chain(&["completions", "man"]) {
        assert!(top.iter().any(|word| word == name), "{name} in {top:?}");
    }
    let cluster = bash_completes(&script, &["sf", "cluster"]);
    for name in ["up", "down", "status", "impair"] {
        assert!(
            cluster.iter().any(|word| word == name),
            "{name} in {cluster:?}"
        );
    }
}

#[test]
fn the_zsh_and_fish_scripts_name_the_subcommands() {
    let zsh = stdout_of(sf(&["completions", "zsh"]));
    assert!(zsh.starts_with("#compdef sf"), "{zsh}");
    let fish = stdout_of(sf(&["completions", "fish"]));
    assert!(fish.contains("complete -c sf "), "{fish}");
    for name in SUBCOMMANDS {
        assert!(
            zsh.contains(&format!("'{name}:")),
            "{name} in the zsh script"
        );
        assert!(
            fish.contains(&format!("-a \"{name}\"")),
            "{name} in the fish script"
        );
    }
}

#[test]
fn an_unknown_shell_is_refused_by_clap() {
    let out = sf(&["completions", "tcsh"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("invalid value 'tcsh'") && stderr.contains("possible values"),
        "{stderr}"
    );
}

#[test]
fn man_prints_the_top_level_page() {
    let page = stdout_of(sf(&["man"]));
    assert!(
        page.lines().any(|line| line.starts_with(".TH sf 1 ")),
        "{page}"
    );
    assert!(page.contains(".SH NAME\nsf \\- "), "{page}");
    for name in SUBCOMMANDS {
        assert!(
            page.contains(&format!("sf\\-{name}(1)")),
            "{name} in {page}"
        );
    }
    // Only subcommands with a page of their own are listed.
    assert!(!page.contains("sf\\-help(1)"), "{page}");
}

#[test]
fn man_out_writes_a_page_per_subcommand_at_every_depth() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("man").join("man1");
    let listed = stdout_of(sf(&["man", "--out", out_dir.to_str().unwrap()]));
    let listed: Vec<PathBuf> = listed.lines().map(PathBuf::from).collect();

    let mut on_disk: Vec<PathBuf> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    on_disk.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, on_disk, "sf prints exactly the pages it writes");

    let names: Vec<String> = listed
        .iter()
        .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for page in [
        "sf.1",
        "sf-run.1",
        "sf-cluster.1",
        "sf-cluster-up.1",
        "sf-descriptor-inspect.1",
        "sf-net-tune.1",
        "sf-man.1",
    ] {
        assert!(names.iter().any(|name| name == page), "{page} in {names:?}");
    }
    assert!(!names.iter().any(|name| name.contains("help")), "{names:?}");

    let nested = out_dir.join("sf-cluster-up.1");
    let roff = std::fs::read_to_string(&nested).unwrap();
    assert!(roff.contains("\n.TH sf-cluster-up 1 "), "{roff}");
    assert!(roff.contains("\\fBsf cluster up\\fR"), "{roff}");
    assert!(roff.contains("\\fB\\-\\-hosts\\fR"), "{roff}");

    let rendered = match Command::new("man")
        .env("MANPAGER", "cat")
        .args(["-P", "cat", "-l"])
        .arg(&nested)
        .output()
    {
        Ok(rendered) => rendered,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            println!("man is not installed: the pages' rendering is not checked");
            return;
        }
        Err(err) => panic!("running man: {err}"),
    };
    let rendered = stdout_of(rendered);
    assert!(rendered.contains("NAME"), "{rendered}");
    assert!(rendered.contains("sf-cluster-up - Start"), "{rendered}");
    assert!(rendered.contains("sf cluster up"), "{rendered}");
}

#[test]
fn the_install_script_writes_completions_and_man_pages_under_a_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("prefix");
    let out = Command::new("sh")
        .arg(install_script())
        .arg(&prefix)
        .env("SF", SF)
        .output()
        .expect("sh runs");
    stdout_of(out);
    assert_installed(&prefix);
}

#[test]
fn the_install_script_uses_the_sf_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("install-shell-files.sh");
    std::fs::copy(install_script(), &script).unwrap();
    std::os::unix::fs::symlink(SF, dir.path().join("sf")).unwrap();
    let prefix = dir.path().join("prefix");
    let out = Command::new("sh")
        .arg(&script)
        .arg(&prefix)
        .env_remove("SF")
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("sh runs");
    stdout_of(out);
    assert_installed(&prefix);
}

fn assert_installed(prefix: &Path) {
    let read = |path: &str| {
        std::fs::read_to_string(prefix.join(path)).unwrap_or_else(|err| panic!("{path}: {err}"))
    };
    assert!(read("share/bash-completion/completions/sf").contains("complete -F _sf"));
    assert!(read("share/zsh/site-functions/_sf").starts_with("#compdef sf"));
    assert!(read("share/fish/vendor_completions.d/sf.fish").contains("complete -c sf "));
    assert!(read("share/man/man1/sf.1").contains(".TH sf 1 "));
    assert!(read("share/man/man1/sf-cluster-up.1").contains(".TH sf-cluster-up 1 "));
}
