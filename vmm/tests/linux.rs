//! Static Linux executables on the real /dev/kvm, with the personality:
//! programs compiled here with `gcc -static` (glibc) start with the stack
//! Linux gives them, make their system calls through the personality (each
//! site trapping once, then patched), and end with their exit status. Bad
//! programs get clear errors.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use snowflock_guest::images::LINUX_PERSONALITY;
use snowflock_vmm::boot::BootError;
use snowflock_vmm::files::{FilesConfig, MountSpec};
use snowflock_vmm::loader::{self, ImageKind, LoadError};
use snowflock_vmm::machine::MachineConfig;
use snowflock_vmm::memory::HostPages;
use snowflock_vmm::{KvmHypervisor, Machine, MachineError, Stop};

/// Compiles `source` (C) with gcc and `flags` into an executable's bytes.
fn compile(source: &str, flags: &[&str]) -> Vec<u8> {
    compile_with("gcc", "program.c", source, flags)
}

/// Compiles `source`, saved as `file`, with `compiler` and `flags`.
fn compile_with(compiler: &str, file: &str, source: &str, flags: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let c = dir.path().join(file);
    let exe = dir.path().join("program");
    std::fs::write(&c, source).expect("write the source");
    let status = Command::new(compiler)
        .args(["-O2", "-o"])
        .arg(&exe)
        .arg(&c)
        .args(flags)
        .status()
        .unwrap_or_else(|e| panic!("{compiler} runs (scripts/deps.sh installs it): {e}"));
    assert!(status.success(), "{compiler} failed on {source}");
    std::fs::read(&exe).expect("read the executable")
}

struct Ran {
    stop: Result<Stop, MachineError>,
    console: String,
    bytes: Vec<u8>,
    syscall_traps: u64,
}

/// Boots `image` with `cmdline` and runs it until it stops.
fn run(image: &[u8], cmdline: &str) -> Ran {
    run_with(image, cmdline, FilesConfig::default())
}

/// Like [`run`], with host files.
fn run_with(image: &[u8], cmdline: &str, files: FilesConfig) -> Ran {
    run_flags(image, cmdline, files, false, false)
}

fn run_flags(
    image: &[u8],
    cmdline: &str,
    files: FilesConfig,
    strace: bool,
    trap_syscalls: bool,
) -> Ran {
    let hv = KvmHypervisor::open().expect("KVM must be available for these tests");
    let console = Arc::new(Mutex::new(Vec::new()));
    let sink = console.clone();
    let config = MachineConfig {
        mem_size: 256 << 20,
        cmdline: cmdline.to_string(),
        console: Arc::new(move |bytes: &[u8]| sink.lock().unwrap().extend_from_slice(bytes)),
        host_pages: HostPages::Base,
        personality: Some(LINUX_PERSONALITY.into()),
        files,
        strace,
        trap_syscalls,
    };
    let mut machine = Machine::boot(&hv, image, &config).expect("boot");
    let stop = machine.run();
    let bytes = console.lock().unwrap().clone();
    Ran {
        stop,
        console: String::from_utf8_lossy(&bytes).into_owned(),
        bytes,
        syscall_traps: machine.syscall_traps(),
    }
}

fn exit_code(ran: &Ran) -> i32 {
    match &ran.stop {
        Ok(Stop::Exited(code)) => *code,
        other => panic!("expected an exit, got {other:?}; console:\n{}", ran.console),
    }
}

const STARTUP: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <unistd.h>
extern char **environ;
int main(int argc, char **argv) {
    printf("argc=%d", argc);
    for (int i = 0; i < argc; i++) printf(" argv[%d]=%s", i, argv[i]);
    printf("\n");
    printf("PATH=%s HOME=%s\n", getenv("PATH"), getenv("HOME"));
    unsigned char *random = (unsigned char *)getauxval(AT_RANDOM);
    int nonzero = 0;
    for (int i = 0; i < 16; i++) nonzero |= random[i];
    printf("pagesz=%lu random_nonzero=%d execfn=%s platform=%s\n",
           getauxval(AT_PAGESZ), nonzero != 0, (char *)getauxval(AT_EXECFN),
           (char *)getauxval(AT_PLATFORM));
    printf("entry_matches=%d phnum_nonzero=%d\n",
           getauxval(AT_ENTRY) != 0, getauxval(AT_PHNUM) > 0);
    /* TLS works: errno lives there, and a thread-local counter. */
    static __thread int counter = 41;
    counter++;
    printf("tls=%d\n", counter);
    return 7;
}
"#;

#[test]
fn a_static_glibc_program_starts_as_linux_starts_it() {
    let image = compile(STARTUP, &["-static"]);
    assert_eq!(loader::kind(&image).unwrap(), ImageKind::Linux);
    let ran = run(&image, "prog first second");
    assert_eq!(exit_code(&ran), 7, "console:\n{}", ran.console);
    let lines: Vec<&str> = ran.console.lines().collect();
    assert_eq!(lines[0], "argc=3 argv[0]=prog argv[1]=first argv[2]=second");
    assert_eq!(lines[1], "PATH=/usr/bin:/bin HOME=/");
    assert_eq!(
        lines[2],
        "pagesz=4096 random_nonzero=1 execfn=prog platform=x86_64"
    );
    assert_eq!(lines[3], "entry_matches=1 phnum_nonzero=1");
    assert_eq!(lines[4], "tls=42");
}

const MEMORY: &str = r#"
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
int main(void) {
    int bad = 0;
    /* brk: grows, reads zeros, shrinks, grows again to zeros. */
    char *base = sbrk(0);
    if (sbrk(1 << 20) != base) bad |= 1;
    for (int i = 0; i < 1 << 20; i += 4096) if (base[i]) bad |= 2;
    memset(base, 0x5a, 1 << 20);
    if (brk(base) != 0) bad |= 4;
    if (sbrk(1 << 20) != base) bad |= 8;
    for (int i = 0; i < 1 << 20; i += 4096) if (base[i]) bad |= 16;
    /* mmap: distinct, zeroed, reusable after munmap, mremap keeps data. */
    char *a = mmap(NULL, 3 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *b = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED || b == MAP_FAILED || (b < a + (3 << 20) && a < b + (1 << 20))) bad |= 32;
    memset(a, 1, 3 << 20);
    if (munmap(a, 3 << 20) != 0) bad |= 64;
    char *c = mmap(NULL, 2 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (int i = 0; i < 2 << 20; i += 512) if (c[i]) { bad |= 128; break; }
    strcpy(b, "kept across mremap");
    char *d = mremap(b, 1 << 20, 8 << 20, MREMAP_MAYMOVE);
    if (d == MAP_FAILED || strcmp(d, "kept across mremap") != 0 || d[(8 << 20) - 1]) bad |= 256;
    /* madvise(DONTNEED) zeroes. */
    c[0] = 9;
    if (madvise(c, 4096, MADV_DONTNEED) != 0 || c[0] != 0) bad |= 512;
    /* A mapping of a descriptor that is not open is refused. */
    if (mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, 99, 0) != MAP_FAILED) bad |= 1024;
    /* Far more than memory: refused. */
    if (mmap(NULL, 1UL << 40, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) != MAP_FAILED) bad |= 2048;
    /* malloc of many sizes. */
    for (int i = 1; i < 2000; i++) { char *p = malloc(i * 97); if (!p) bad |= 4096; p[i * 97 - 1] = 1; free(p); }
    printf("bad=%d\n", bad);
    return bad != 0;
}
"#;

#[test]
fn break_and_mappings_behave_as_on_linux() {
    let ran = run(&compile(MEMORY, &["-static"]), "memory");
    assert_eq!(exit_code(&ran), 0, "console:\n{}", ran.console);
    assert_eq!(ran.console, "bad=0\n");
}

const MANY_CALLS: &str = r#"
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    long sum = 0;
    for (int i = 0; i < 20000; i++) sum += syscall(SYS_getpid) + getppid();
    printf("sum=%ld\n", sum);
    return 0;
}
"#;

#[test]
fn each_syscall_site_exits_to_the_vmm_once() {
    let ran = run(&compile(MANY_CALLS, &["-static"]), "calls");
    assert_eq!(exit_code(&ran), 0, "console:\n{}", ran.console);
    assert_eq!(ran.console, "sum=20000\n");
    // 40 000 calls in the loop, a few dozen sites in all of glibc's startup.
    assert!(
        (1..100).contains(&ran.syscall_traps),
        "{} syscall traps",
        ran.syscall_traps
    );
}

const UNIMPLEMENTED: &str = r#"
#include <errno.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    int fds[2];
    long r = syscall(SYS_pipe, fds);
    printf("pipe=%ld errno_enosys=%d\n", r, errno == ENOSYS);
    syscall(SYS_pipe, fds);
    return 3;
}
"#;

#[test]
fn unimplemented_calls_fail_with_enosys_and_are_reported() {
    let ran = run(&compile(UNIMPLEMENTED, &["-static"]), "unimplemented");
    assert_eq!(exit_code(&ran), 3, "console:\n{}", ran.console);
    assert!(ran.console.contains("pipe=-1 errno_enosys=1\n"));
    assert!(
        ran.console
            .contains("sf-linux: unimplemented system calls: pipe (22) x2"),
        "console:\n{}",
        ran.console
    );
}

const BAD_POINTER: &str = r#"
#include <errno.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    long r = syscall(SYS_write, 1, (void *)0x10, 100);
    int efault = errno == EFAULT;
    r += syscall(SYS_write, 1, (void *)-4096L, 10);
    efault &= errno == EFAULT;
    printf("r=%ld efault=%d\n", r, efault);
    return 0;
}
"#;

#[test]
fn a_bad_pointer_is_efault_to_the_program_not_a_vmm_error() {
    let ran = run(&compile(BAD_POINTER, &["-static"]), "badptr");
    assert_eq!(exit_code(&ran), 0, "console:\n{}", ran.console);
    assert_eq!(ran.console, "r=-2 efault=1\n");
}

const NULL_CALL: &str = r#"
#include <stdio.h>
int main(int argc, char **argv) {
    (void)argv;
    void (*volatile function)(void) = (void (*)(void))(long)(argc - 1);
    printf("calling\n");
    fflush(stdout);
    function();
    return 0;
}
"#;

#[test]
fn a_call_through_a_null_function_pointer_ends_the_vm_with_the_reason() {
    let ran = run(&compile(NULL_CALL, &["-static"]), "nullcall");
    let error = ran.stop.expect_err("the VM must fail");
    let text = error.to_string();
    assert!(text.contains("null function pointer"), "{text}");
}

#[test]
fn a_dynamically_linked_program_is_refused_with_the_fix() {
    let image = compile("int main(void) { return 0; }", &[]);
    let error = loader::kind(&image).unwrap_err();
    assert!(matches!(error, LoadError::DynamicLinux { .. }), "{error:?}");
    assert!(
        error.to_string().contains("link it with -static"),
        "{error}"
    );
    let hv = KvmHypervisor::open().expect("KVM");
    let config = MachineConfig {
        personality: Some(LINUX_PERSONALITY.into()),
        ..MachineConfig::default()
    };
    let refused = Machine::boot(&hv, &image, &config).unwrap_err();
    assert!(
        matches!(
            refused,
            MachineError::Boot(BootError::Load(LoadError::DynamicLinux { .. }))
        ),
        "{refused:?}"
    );
}

#[test]
fn a_linux_program_without_a_personality_is_refused() {
    let hv = KvmHypervisor::open().expect("KVM");
    let image = compile(MANY_CALLS, &["-static"]);
    let refused = Machine::boot(&hv, &image, &MachineConfig::default()).unwrap_err();
    assert!(
        matches!(refused, MachineError::Boot(BootError::NoPersonality)),
        "{refused:?}"
    );
}

#[test]
fn a_flock_image_that_makes_a_linux_system_call_gets_a_clear_error() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest/guest.ld");
    let image = compile(
        "void _start(void) { __asm__ volatile(\"mov $39, %eax; syscall\"); for (;;) {} }",
        &[
            "-nostdlib",
            "-static",
            "-no-pie",
            "-ffreestanding",
            "-Wl,--build-id=none",
            &format!("-Wl,-T,{}", script.display()),
        ],
    );
    assert_eq!(loader::kind(&image).unwrap(), ImageKind::Flock);
    let ran = run(&image, "");
    let error = ran.stop.expect_err("the VM must fail");
    assert!(
        matches!(error, MachineError::SyscallInFlockImage { .. }),
        "{error:?}"
    );
}

const FILES: &str = r#"
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
int main(void) {
    int bad = 0;
    char line[256];
    FILE *f = fopen("/data/input.txt", "r");
    if (!f || !fgets(line, sizeof line, f) || strcmp(line, "hello from the host\n") != 0) bad |= 1;
    if (f) fclose(f);
    /* A large file, read through stdio in the blocks fstat suggests. */
    struct stat st;
    unsigned long sum = 0;
    f = fopen("/data/sub/big.bin", "rb");
    if (!f || fstat(fileno(f), &st) != 0 || st.st_size != 3000000 || !S_ISREG(st.st_mode)) bad |= 2;
    int c;
    long count = 0;
    while (f && (c = fgetc(f)) != EOF) { sum += (unsigned long)c; count++; }
    if (count != 3000000) bad |= 4;
    if (f) fclose(f);
    /* pread at an offset, and lseek to the end. */
    int fd = open("/data/input.txt", O_RDONLY);
    char word[5] = {0};
    if (fd < 0 || pread(fd, word, 4, 6) != 4 || strcmp(word, "from") != 0) bad |= 8;
    if (lseek(fd, 0, SEEK_END) != 20) bad |= 16;
    close(fd);
    /* Mounts are read-only; nothing outside them is reachable. */
    if (open("/data/input.txt", O_WRONLY) >= 0 || errno != EROFS) bad |= 32;
    if (open("/data/outside/passwd", O_RDONLY) >= 0) bad |= 64;
    if (open("/data/../../etc/passwd", O_RDONLY) >= 0) bad |= 128;
    /* Listing a mount. */
    DIR *dir = opendir("/data");
    int seen = 0;
    struct dirent *e;
    while (dir && (e = readdir(dir))) {
        if (strcmp(e->d_name, "input.txt") == 0 && e->d_type == DT_REG) seen |= 1;
        if (strcmp(e->d_name, "sub") == 0 && e->d_type == DT_DIR) seen |= 2;
    }
    if (seen != 3) bad |= 256;
    if (dir) closedir(dir);
    /* The in-VM file system: write, append, read back, rename, list, unlink. */
    if (mkdir("/tmp/work", 0755) != 0) bad |= 512;
    if (chdir("/tmp/work") != 0) bad |= 1024;
    FILE *w = fopen("notes.txt", "w");
    for (int i = 0; i < 10000; i++) fprintf(w, "line %d\n", i);
    fclose(w);
    w = fopen("/tmp/work/notes.txt", "a");
    fputs("the end\n", w);
    fclose(w);
    if (rename("notes.txt", "kept.txt") != 0) bad |= 2048;
    f = fopen("kept.txt", "r");
    int lines = 0;
    while (f && fgets(line, sizeof line, f)) lines++;
    if (lines != 10001 || strcmp(line, "the end\n") != 0) bad |= 4096;
    if (f) fclose(f);
    char cwd[64];
    if (!getcwd(cwd, sizeof cwd) || strcmp(cwd, "/tmp/work") != 0) bad |= 8192;
    if (unlink("kept.txt") != 0 || access("kept.txt", F_OK) == 0 || rmdir("/tmp/work") != 0) bad |= 16384;
    /* Standard input comes from the host file given. */
    if (!fgets(line, sizeof line, stdin) || strcmp(line, "from stdin\n") != 0) bad |= 32768;
    printf("bad=%d sum=%lu\n", bad, sum);
    return bad != 0;
}
"#;

#[test]
fn a_program_reads_host_mounts_and_writes_its_own_files_in_guest_memory() {
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("input.txt"), "hello from the host\n").unwrap();
    std::fs::create_dir(host.path().join("sub")).unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(host.path().join("sub/big.bin"), &big).unwrap();
    // A symlink out of the mount must not be followed.
    std::os::unix::fs::symlink("/etc", host.path().join("outside")).unwrap();
    let stdin = host.path().join("stdin.txt");
    std::fs::write(&stdin, "from stdin\n").unwrap();
    let files = FilesConfig {
        mounts: vec![MountSpec {
            host: host.path().to_path_buf(),
            guest: "/data".into(),
            identity: None,
        }],
        stdin: Some(stdin),
        out: None,
    };
    let ran = run_with(&compile(FILES, &["-static"]), "files", files);
    let sum: u64 = big.iter().map(|&b| u64::from(b)).sum();
    assert_eq!(exit_code(&ran), 0, "console:\n{}", ran.console);
    assert_eq!(ran.console, format!("bad=0 sum={sum}\n"));
}

#[test]
fn a_musl_program_runs_too() {
    let image = compile_with("musl-gcc", "program.c", STARTUP, &["-static"]);
    let ran = run(&image, "prog first second");
    assert_eq!(exit_code(&ran), 7, "console:\n{}", ran.console);
    let lines: Vec<&str> = ran.console.lines().collect();
    assert_eq!(lines[0], "argc=3 argv[0]=prog argv[1]=first argv[2]=second");
    assert_eq!(lines[4], "tls=42");
}

const FORTRAN: &str = "
program pisum
  implicit none
  integer :: i, n
  real(8) :: s
  character(len=32) :: arg
  call get_command_argument(1, arg)
  read(arg, *) n
  s = 0d0
  do i = 1, n
    s = s + 1d0 / (dble(i) * dble(i))
  end do
  write(*, '(a,i0,a,f11.8)') 'n=', n, ' pi=', sqrt(6d0 * s)
end program pisum
";

#[test]
fn a_fortran_program_runs_and_computes_what_it_does_natively() {
    let image = compile_with("gfortran", "pisum.f90", FORTRAN, &["-static"]);
    let ran = run(&image, "pisum 200000");
    assert_eq!(exit_code(&ran), 0, "console:\n{}", ran.console);
    assert_eq!(ran.console, "n=200000 pi= 3.14158788\n");
}

/// Runs a host command and returns its standard output.
fn host(command: &str, args: &[&str], dir: &Path) -> Vec<u8> {
    let output = Command::new(command)
        .args(args)
        .current_dir(dir)
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| panic!("{command}: {e}"));
    assert!(output.status.success(), "{command} {args:?}");
    output.stdout
}

#[test]
fn busybox_applets_over_a_mount_give_what_the_host_tools_give() {
    let busybox = std::fs::read("/bin/busybox")
        .expect("/bin/busybox (busybox-static, which scripts/deps.sh installs)");
    let data = tempfile::tempdir().unwrap();
    let words = ["pear", "apple", "fig", "banana", "cherry", "kiwi", "date"];
    let text: String = (0..5000)
        .map(|i| {
            format!(
                "{} {} {}\n",
                words[i * 7 % 7 + i % 3],
                i * 31 % 997,
                words[i % 7]
            )
        })
        .collect();
    std::fs::write(data.path().join("input.txt"), &text).unwrap();
    let files = || FilesConfig {
        mounts: vec![MountSpec {
            host: data.path().to_path_buf(),
            guest: "/data".into(),
            identity: None,
        }],
        stdin: None,
        out: None,
    };
    let applet = |args: &str| -> Vec<u8> {
        let ran = run_with(&busybox, &format!("busybox {args}"), files());
        assert_eq!(exit_code(&ran), 0, "busybox {args}:\n{}", ran.console);
        ran.bytes
    };
    let hash = String::from_utf8(applet("sha256sum /data/input.txt")).unwrap();
    let expected = String::from_utf8(host("sha256sum", &["input.txt"], data.path())).unwrap();
    assert_eq!(
        hash.split_whitespace().next(),
        expected.split_whitespace().next()
    );
    assert_eq!(
        applet("sort /data/input.txt"),
        host("sort", &["input.txt"], data.path())
    );
    assert_eq!(
        applet("awk {print$2} /data/input.txt"),
        host("awk", &["{print$2}", "input.txt"], data.path())
    );
    let counts = |out: Vec<u8>| -> Vec<u64> {
        String::from_utf8(out)
            .unwrap()
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect()
    };
    assert_eq!(
        counts(applet("wc /data/input.txt")),
        counts(host("wc", &["input.txt"], data.path()))
    );
    // gzip's stream, decompressed by the host's gzip, is the input.
    let compressed = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(compressed.path(), applet("gzip -c /data/input.txt")).unwrap();
    let path = compressed.path().to_str().unwrap();
    assert_eq!(host("gzip", &["-dc", path], data.path()), text.as_bytes());
}

#[test]
fn strace_prints_every_call_with_its_result() {
    let source = "#include <unistd.h>\nint main(void) { write(1, \"hi\\n\", 3); \
                  if (fork() >= 0) return 9; return getppid(); }";
    let ran = run_flags(
        &compile(source, &["-static"]),
        "traced",
        FilesConfig::default(),
        true,
        false,
    );
    assert_eq!(exit_code(&ran), 0, "console:\n{}", ran.console);
    let lines: Vec<&str> = ran.console.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("[strace] write(0x1,") && l.contains(") = 3")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("[strace] getppid(") && l.contains(") = 0")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("[strace] exit_group(0x0") && l.contains(") = ?")),
        "{lines:?}"
    );
    assert!(lines.contains(&"hi"), "{lines:?}");
    assert!(
        lines.iter().any(|l| l.starts_with("[strace] clone(")
            && l.contains(
                ") = -38 (one process per VM: threads, fork and exec are not supported)"
            )),
        "{lines:?}"
    );
}

const RUST: &str = r#"
use std::io::Read;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut values: Vec<u64> = (0..100_000u64).map(|i| i * 7919 % 10007).collect();
    values.sort_unstable();
    std::fs::create_dir_all("/out/rust").unwrap();
    std::fs::write("/out/rust/sum", values.iter().sum::<u64>().to_string()).unwrap();
    let mut back = String::new();
    std::fs::File::open("/out/rust/sum").unwrap().read_to_string(&mut back).unwrap();
    let threads = std::thread::Builder::new().spawn(|| ()).is_err();
    println!("args={args:?} sum={back} threads_refused={threads}");
}
"#;

#[test]
fn a_static_rust_std_program_runs() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("main.rs");
    let exe = dir.path().join("main");
    std::fs::write(&source, RUST).unwrap();
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let status = Command::new(rustc)
        .args(["-O", "-C", "target-feature=+crt-static", "-o"])
        .arg(&exe)
        .arg(&source)
        .status()
        .expect("rustc runs");
    assert!(status.success());
    let ran = run(&std::fs::read(&exe).unwrap(), "main x");
    assert_eq!(exit_code(&ran), 0, "console:\n{}", ran.console);
    assert_eq!(
        ran.console,
        "args=[\"main\", \"x\"] sum=500304918 threads_refused=true\n"
    );
}

#[test]
fn abort_ends_the_program_with_the_signal_s_status() {
    let source = "#include <stdlib.h>\nint main(void) { abort(); }";
    let ran = run(&compile(source, &["-static"]), "aborts");
    assert_eq!(exit_code(&ran), 128 + 6, "console:\n{}", ran.console);
    assert!(
        ran.console
            .contains("sf-linux: the program raised signal 6")
    );
}

const MAPPED: &str = r#"
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
int main(void) {
    int bad = 0;
    int fd = open("/data/input.txt", O_RDONLY);
    char *map = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED || memcmp(map, "hello from the host\n", 20) != 0 || map[20] != 0) bad |= 1;
    map[0] = 'J'; /* private: the file does not change */
    char again[6] = {0};
    if (pread(fd, again, 5, 0) != 5 || strcmp(again, "hello") != 0) bad |= 2;
    if (mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) != MAP_FAILED) bad |= 4;
    struct statx sx;
    if (statx(AT_FDCWD, "/data/input.txt", 0, STATX_BASIC_STATS, &sx) != 0 || sx.stx_size != 20 ||
        !S_ISREG(sx.stx_mode)) bad |= 8;
    /* A system call from writable memory: never patched, it traps every time. */
    static const unsigned char code[] = {0xb8, 0x27, 0, 0, 0, 0x0f, 0x05, 0xc3};
    unsigned char *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_EXEC,
                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memcpy(page, code, sizeof code);
    long pid = 0;
    for (int i = 0; i < 200; i++) pid += ((long (*)(void))page)();
    if (pid != 200 || memcmp(page, code, sizeof code) != 0) bad |= 16;
    printf("bad=%d\n", bad);
    return bad != 0;
}
"#;

#[test]
fn private_file_mappings_statx_and_unpatched_sites_work() {
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("input.txt"), "hello from the host\n").unwrap();
    let files = FilesConfig {
        mounts: vec![MountSpec {
            host: host.path().to_path_buf(),
            guest: "/data".into(),
            identity: None,
        }],
        stdin: None,
        out: None,
    };
    let ran = run_with(&compile(MAPPED, &["-static"]), "mapped", files);
    assert_eq!(exit_code(&ran), 0, "console:\n{}", ran.console);
    assert_eq!(ran.console, "bad=0\n");
    assert!(ran.syscall_traps >= 200, "{} traps", ran.syscall_traps);
}

#[test]
fn with_patching_off_every_call_traps_and_the_program_is_unchanged() {
    let source = "#include <stdio.h>\n#include <unistd.h>\n\
                  int main(void) { long s = 0; for (int i = 0; i < 300; i++) s += getppid() + 1; \
                  printf(\"s=%ld\\n\", s); return 0; }";
    let ran = run_flags(
        &compile(source, &["-static"]),
        "trapped",
        FilesConfig::default(),
        false,
        true,
    );
    assert_eq!(exit_code(&ran), 0, "console:\n{}", ran.console);
    assert_eq!(ran.console, "s=300\n");
    assert!(ran.syscall_traps >= 300, "{} traps", ran.syscall_traps);
}
