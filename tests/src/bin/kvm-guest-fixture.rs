//! `kvm-guest-fixture`: a minimal real VMM for tests.
//!
//! It opens `/dev/kvm`, creates one VM with `--vcpus N` vCPUs and runs each
//! vCPU on its own thread named like QEMU's (`CPU N/KVM`). Every vCPU runs a
//! tiny real-mode guest loop: a short busy loop inside the guest, then
//! `out 0x10, al`, which makes `KVM_RUN` return to the thread with a port I/O
//! exit; the thread sleeps `--exit-sleep-us` and re-enters the guest. The
//! process therefore holds real `anon_inode:kvm-vm` and
//! `anon_inode:kvm-vcpu:N` file descriptors and real vCPU threads, which is
//! what `sevplace::discovery` and `sevplace::cgroup` are tested against.
//!
//! Usage: `kvm-guest-fixture [--vcpus N] [--seconds S] [--exit-sleep-us U]
//! [--thread-prefix P] [anything else]`. `--thread-prefix P` names vCPU
//! threads `P0`, `P1`, ... instead of QEMU's `CPU N/KVM`. `--help` prints
//! the usage and exits. Other unknown arguments are ignored so a test can
//! put QEMU-style flags (`-name guest=foo -object sev-guest,...`) on the
//! command line. Once every vCPU has completed one guest round trip the
//! fixture prints `ready pid=<pid>` on stdout. It runs until killed or for
//! `S` seconds.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};

/// Guest-physical address where the guest code is loaded and started.
const GUEST_CODE_GPA: u64 = 0x1000;
/// Size of the single guest memory slot.
const GUEST_MEM_SIZE: usize = 0x1000;
/// The port the guest writes to; each write is one exit to this process.
const GUEST_PORT: u16 = 0x10;

/// 16-bit real-mode guest code:
/// ```text
/// 0: B9 FF 0F   mov cx, 0x0fff
/// 3: E2 FE      loop 3          ; spin inside the guest
/// 5: FE C0      inc al
/// 7: E6 10      out 0x10, al    ; exit to the VMM
/// 9: EB F5      jmp 0
/// ```
const GUEST_CODE: [u8; 11] = [
    0xB9, 0xFF, 0x0F, 0xE2, 0xFE, 0xFE, 0xC0, 0xE6, 0x10, 0xEB, 0xF5,
];

struct Args {
    vcpus: u8,
    /// `None`: QEMU's `CPU N/KVM`; `Some(p)`: `pN` (another VMM's naming).
    thread_prefix: Option<String>,
    seconds: Option<u64>,
    exit_sleep: Duration,
}

const USAGE: &str = "usage: kvm-guest-fixture [--vcpus N] [--seconds S] [--exit-sleep-us U] \
[--thread-prefix P] [QEMU-style flags, ignored]
Runs a real KVM VM with N vCPU threads named 'CPU N/KVM' (or 'P0', 'P1', ...),
prints 'ready pid=<pid>' once every vCPU entered the guest, and runs until
killed or for S seconds.";

/// Parsed command line, or `None` when usage was requested.
fn parse_args() -> Result<Option<Args>, String> {
    let mut args = Args {
        vcpus: 2,
        thread_prefix: None,
        seconds: None,
        exit_sleep: Duration::from_micros(5000),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--help" | "-h" => return Ok(None),
            "--vcpus" => {
                let v = it.next().ok_or("--vcpus needs a value")?;
                args.vcpus = v
                    .parse()
                    .map_err(|_| format!("--vcpus {v:?} is not a number"))?;
                if args.vcpus == 0 {
                    return Err("--vcpus must be at least 1".into());
                }
            }
            "--thread-prefix" => {
                args.thread_prefix = Some(it.next().ok_or("--thread-prefix needs a value")?);
            }
            "--seconds" => {
                let v = it.next().ok_or("--seconds needs a value")?;
                args.seconds = Some(
                    v.parse()
                        .map_err(|_| format!("--seconds {v:?} is not a number"))?,
                );
            }
            "--exit-sleep-us" => {
                let v = it.next().ok_or("--exit-sleep-us needs a value")?;
                args.exit_sleep = Duration::from_micros(
                    v.parse()
                        .map_err(|_| format!("--exit-sleep-us {v:?} is not a number"))?,
                );
            }
            // QEMU-style flags and anything else are carried but ignored.
            _ => {}
        }
    }
    Ok(Some(args))
}

/// Points the vCPU at the guest code in 16-bit real mode.
fn setup_vcpu(vcpu: &VcpuFd) -> Result<(), String> {
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    regs.rip = GUEST_CODE_GPA;
    regs.rax = 0;
    regs.rflags = 0x2;
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
    Ok(())
}

/// Runs one vCPU forever: enter the guest, handle the port write, sleep, repeat.
fn run_vcpu(
    index: u8,
    mut vcpu: VcpuFd,
    entered: Arc<AtomicUsize>,
    exit_sleep: Duration,
    thread_prefix: Option<String>,
) {
    // QEMU names its vCPU threads "CPU N/KVM"; discovery maps indices by it.
    let name = match thread_prefix {
        None => format!("CPU {index}/KVM"),
        Some(p) => format!("{p}{index}"),
    };
    if let Ok(cname) = std::ffi::CString::new(name) {
        let _ = nix::sys::prctl::set_name(&cname);
    }
    let mut first = true;
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, _data)) if port == GUEST_PORT => {
                if first {
                    first = false;
                    entered.fetch_add(1, Ordering::SeqCst);
                }
                if !exit_sleep.is_zero() {
                    std::thread::sleep(exit_sleep);
                }
            }
            Ok(exit) => {
                eprintln!("kvm-guest-fixture: vCPU {index}: unexpected exit {exit:?}");
                std::process::exit(3);
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                eprintln!("kvm-guest-fixture: vCPU {index}: KVM_RUN: {e}");
                std::process::exit(3);
            }
        }
    }
}

fn run() -> Result<(), String> {
    let Some(args) = parse_args()? else {
        println!("{USAGE}");
        return Ok(());
    };
    let kvm = Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;

    // SAFETY: an anonymous private mapping with no file; checked for failure.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            GUEST_MEM_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err(format!(
            "mmap guest memory: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `mem` is a fresh writable mapping of GUEST_MEM_SIZE bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(GUEST_CODE.as_ptr(), mem.cast::<u8>(), GUEST_CODE.len());
    }
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: GUEST_CODE_GPA,
        memory_size: GUEST_MEM_SIZE as u64,
        userspace_addr: mem as u64,
        flags: 0,
    };
    // SAFETY: the mapping lives for the whole process and is not unmapped.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;

    let entered = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for i in 0..args.vcpus {
        let vcpu = vm
            .create_vcpu(u64::from(i))
            .map_err(|e| format!("KVM_CREATE_VCPU {i}: {e}"))?;
        setup_vcpu(&vcpu)?;
        let entered = Arc::clone(&entered);
        let sleep = args.exit_sleep;
        let prefix = args.thread_prefix.clone();
        let h = std::thread::Builder::new()
            .spawn(move || run_vcpu(i, vcpu, entered, sleep, prefix))
            .map_err(|e| format!("spawn vCPU thread {i}: {e}"))?;
        handles.push(h);
    }

    let start = Instant::now();
    while entered.load(Ordering::SeqCst) < usize::from(args.vcpus) {
        if start.elapsed() > Duration::from_secs(20) {
            return Err("vCPUs did not enter the guest within 20 s".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready pid={}", std::process::id()).map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())?;
    drop(out);

    match args.seconds {
        Some(s) => std::thread::sleep(Duration::from_secs(s)),
        None => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
    }
    // Keep the VM alive until here; exiting the process tears it down.
    drop(vm);
    std::process::exit(0)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvm-guest-fixture: {e}");
            ExitCode::FAILURE
        }
    }
}
