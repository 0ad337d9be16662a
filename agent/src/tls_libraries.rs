//! Which TLS libraries the observed processes map, and when each is hooked
//! or let go. Pure bookkeeping; `ebpf` attaches and detaches the uprobes,
//! `procfs` reads the mappings.
//!
//! Uprobes belong to a file (an inode): the kernel puts a breakpoint at
//! each hooked function in every process that maps the file, unless the
//! probe is limited to a process. A breakpoint costs a trap at each call,
//! whether the program that runs then cares or not, so by default
//! ([`HookScope::Process`]) the breakpoints are only in the observed
//! processes (those that made a connection) that map the file; with
//! [`HookScope::File`] one attachment serves every process that maps the
//! file, now or later, in any container, from its very first call.
//!
//! Libraries are keyed by file, opened the first time an observed process
//! is seen mapping them, and let go once no such process has mapped them
//! for a while: a library upgraded on disk is a new file, and the
//! attachment would otherwise pin the old one.

use std::collections::{BTreeMap, HashMap, HashSet};

/// How long a hooked library stays hooked after its last known user left:
/// a program that starts again soon keeps its first statements.
pub const UNUSED_GRACE_NS: u64 = 60_000_000_000;

/// Files hooked at most: every local user can make copies of a library and
/// map them, and each hook costs the kernel a little.
pub const MAX_HOOKED_LIBRARIES: usize = 64;

/// Files one user's processes may have hooked first: so that one user's
/// copies cannot use up the room of everyone else's libraries.
pub const MAX_LIBRARIES_PER_USER: usize = 8;

/// Processes with breakpoints of their own ([`HookScope::Process`]), in
/// all: each holds one perf event (an fd) per hooked function.
pub const MAX_HOOKED_PROCESSES: usize = 1024;

/// Of those, one user's processes: so that one user's many processes
/// cannot take every other user's room.
pub const MAX_HOOKED_PROCESSES_PER_USER: usize = 256;

/// Which processes get a hooked library's breakpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookScope {
    /// Per file: `file` where the probes sit at instructions the kernel
    /// emulates (every process is read from its first call, and every
    /// program that maps the file pays its traps, ~2.5 us a call on our
    /// test VM), `process` where they must be single-stepped (a VM exit
    /// each under a hypervisor: only the observed processes pay it).
    Auto,
    /// Only the observed processes that map it, each from its first
    /// connect on: a database server or any other program that maps the
    /// same file pays nothing. The default: every hooked call costs its
    /// traps (BENCHMARKS.md, "TLS: where a query's cost goes").
    #[default]
    Process,
    /// Every process that maps the file, from its first call: a process's
    /// first connection is read even when it races the agent, but every
    /// program that maps the file pays a trap per TLS call.
    File,
}

/// A file as the kernel knows it: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
}

/// A TLS library one process maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedLibrary {
    pub file: FileId,
    /// Its path inside the process's mount namespace.
    pub path: String,
}

/// OpenSSL's libssl as processes map it: `libssl.so.3`, `libssl.so.1.1`,
/// and the renamed copies that Python wheels bundle
/// (`libssl-6a9b88ec.so.3`).
pub fn is_tls_library(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    let Some(rest) = name.strip_prefix("libssl") else {
        return false;
    };
    let version_follows = rest.starts_with(".so") || rest.starts_with('-') && rest.contains(".so");
    version_follows && !path.ends_with(" (deleted)")
}

/// What was asked of the kernel side for one library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookState {
    /// Being opened and attached.
    Pending,
    /// Attached, with breakpoints in every process that maps it
    /// ([`HookScope::File`]) or in the observed ones ([`HookScope::Process`]).
    Hooked(HookScope),
    /// Attaching failed (say why): not tried again while it stays known.
    Refused(String),
    /// More files than [`MAX_HOOKED_LIBRARIES`] were seen, or than
    /// [`MAX_LIBRARIES_PER_USER`] first seen in one user's processes.
    OverLimit,
}

#[derive(Debug)]
struct Library {
    path: String,
    /// The user whose process showed it first (its share of the room).
    first_uid: u32,
    state: HookState,
    users: HashSet<u32>,
    /// [`HookScope::Process`]: the users whose breakpoints are set.
    attached: HashSet<u32>,
    unused_since_ns: Option<u64>,
}

/// One library as the bookkeeping knows it, and as
/// `/api/v1/tls/libraries` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LibraryStatus {
    /// Its path inside the mount namespace of the process that showed it.
    pub path: String,
    pub inode: u64,
    pub hooked: bool,
    /// Once hooked: `file` (every process that maps it has breakpoints)
    /// or `process` (only the observed ones, `processes_hooked`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<HookScope>,
    /// Why it is not hooked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Observed processes that map it.
    pub processes: usize,
    /// Of those, the processes with breakpoints ([`HookScope::Process`];
    /// with [`HookScope::File`] every process that maps it has them).
    pub processes_hooked: usize,
}

/// The TLS libraries of the observed processes.
#[derive(Debug, Default)]
pub struct TlsLibraries {
    scope: HookScope,
    libraries: BTreeMap<FileId, Library>,
    by_pid: HashMap<u32, Vec<FileId>>,
    /// The user each observed process runs as.
    uids: HashMap<u32, u32>,
    /// When each process's libraries were last looked at again.
    looked_again_ns: HashMap<u32, u64>,
    /// Executables looked at: whether each exports OpenSSL's functions.
    executables: HashMap<FileId, bool>,
}

/// Executables whose verdict is kept; past this the memory starts over.
const EXECUTABLES_KEPT: usize = 4096;

/// What to do with one process's breakpoints in one library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessHook {
    pub file: FileId,
    pub pid: u32,
}

impl TlsLibraries {
    pub fn new(scope: HookScope) -> Self {
        Self {
            scope,
            ..Self::default()
        }
    }

    /// The scope of a library about to be hooked, whose probes sit at
    /// instructions the kernel emulates (`emulated`) or not.
    pub fn scope_for(&self, emulated: bool) -> HookScope {
        match self.scope {
            HookScope::Auto if emulated => HookScope::File,
            HookScope::Auto => HookScope::Process,
            scope => scope,
        }
    }

    /// `pid`, run by `uid`, maps `mapped`: the libraries to open and hook
    /// now, each with the path given (to be opened through the process's
    /// root). Call [`Self::hook_result`] with the outcome of each, and
    /// attach [`Self::processes_to_attach`] afterwards.
    pub fn process_maps(
        &mut self,
        pid: u32,
        uid: u32,
        mapped: &[MappedLibrary],
    ) -> Vec<MappedLibrary> {
        let mut to_hook = Vec::new();
        self.uids.insert(pid, uid);
        let files = self.by_pid.entry(pid).or_default();
        for lib in mapped {
            if files.contains(&lib.file) {
                continue;
            }
            files.push(lib.file);
            let known = self.libraries.len();
            let users_own = self
                .libraries
                .values()
                .filter(|l| l.first_uid == uid)
                .count();
            let entry = self.libraries.entry(lib.file).or_insert_with(|| {
                let full = known >= MAX_HOOKED_LIBRARIES || users_own >= MAX_LIBRARIES_PER_USER;
                let state = if full {
                    HookState::OverLimit
                } else {
                    to_hook.push(lib.clone());
                    HookState::Pending
                };
                Library {
                    path: lib.path.clone(),
                    first_uid: uid,
                    state,
                    users: HashSet::new(),
                    attached: HashSet::new(),
                    unused_since_ns: None,
                }
            });
            entry.users.insert(pid);
            entry.unused_since_ns = None;
        }
        to_hook
    }

    /// Whether `pid` maps a hooked library and has its breakpoints.
    pub fn hooks_process(&self, pid: u32) -> bool {
        self.by_pid.get(&pid).is_some_and(|files| {
            files.iter().any(|f| {
                self.libraries.get(f).is_some_and(|l| {
                    l.state == HookState::Hooked(HookScope::File)
                        || (l.state == HookState::Hooked(HookScope::Process)
                            && l.attached.contains(&pid))
                })
            })
        })
    }

    /// [`HookScope::Process`]: the observed processes that map a hooked
    /// library and have no breakpoints in it yet, within the bounds
    /// ([`MAX_HOOKED_PROCESSES`], [`MAX_HOOKED_PROCESSES_PER_USER`]). Tell
    /// [`Self::process_attached`] the outcome of each.
    pub fn processes_to_attach(&self) -> Vec<ProcessHook> {
        let mut per_user: HashMap<u32, usize> = HashMap::new();
        let mut total = 0;
        for lib in self.libraries.values() {
            for pid in &lib.attached {
                total += 1;
                *per_user.entry(self.uid_of(*pid)).or_default() += 1;
            }
        }
        let mut wanted = Vec::new();
        for (file, lib) in &self.libraries {
            if lib.state != HookState::Hooked(HookScope::Process) {
                continue;
            }
            let mut waiting: Vec<u32> = lib.users.difference(&lib.attached).copied().collect();
            waiting.sort_unstable();
            for pid in waiting {
                let users_own = per_user.entry(self.uid_of(pid)).or_default();
                if total >= MAX_HOOKED_PROCESSES || *users_own >= MAX_HOOKED_PROCESSES_PER_USER {
                    continue;
                }
                total += 1;
                *users_own += 1;
                wanted.push(ProcessHook { file: *file, pid });
            }
        }
        wanted
    }

    /// The outcome of one of [`Self::processes_to_attach`]. A process that
    /// could not be attached to (it exited) is no longer counted as a
    /// user of the library.
    pub fn process_attached(&mut self, hook: ProcessHook, attached: bool) {
        if let Some(lib) = self.libraries.get_mut(&hook.file) {
            if attached {
                lib.attached.insert(hook.pid);
            } else {
                lib.users.remove(&hook.pid);
            }
        }
    }

    fn uid_of(&self, pid: u32) -> u32 {
        self.uids.get(&pid).copied().unwrap_or(u32::MAX)
    }

    /// Whether `pid`'s libraries may be looked at again now: at most once
    /// per `interval_ns` (a process with many encrypted connections that
    /// no library gives the plaintext of, e.g. Go's or Java's own TLS,
    /// would otherwise have /proc read at each).
    pub fn may_look_again(&mut self, pid: u32, now_ns: u64, interval_ns: u64) -> bool {
        match self.looked_again_ns.get(&pid) {
            Some(&last) if now_ns.saturating_sub(last) < interval_ns => false,
            _ => {
                self.looked_again_ns.insert(pid, now_ns);
                true
            }
        }
    }

    /// Whether the executable `file` exports OpenSSL's functions, if it
    /// was looked at.
    pub fn executable_verdict(&self, file: FileId) -> Option<bool> {
        self.executables.get(&file).copied()
    }

    /// What looking at the executable `file` found.
    pub fn record_executable(&mut self, file: FileId, exports_tls: bool) {
        if self.executables.len() >= EXECUTABLES_KEPT {
            self.executables.clear();
        }
        self.executables.insert(file, exports_tls);
    }

    /// Whether `file` waits for its hook (it may have been let go since
    /// [`Self::process_maps`] asked for it).
    pub fn is_pending(&self, file: FileId) -> bool {
        self.libraries
            .get(&file)
            .is_some_and(|lib| lib.state == HookState::Pending)
    }

    /// The kernel side's answer for a library [`Self::process_maps`] asked
    /// to hook: hooked in a scope ([`Self::scope_for`]), or refused.
    pub fn hook_result(&mut self, file: FileId, result: Result<HookScope, String>) {
        if let Some(lib) = self.libraries.get_mut(&file) {
            lib.state = match result {
                Ok(scope) => HookState::Hooked(scope),
                Err(why) => HookState::Refused(why),
            };
        }
    }

    /// A library asked for could not be opened because the process that
    /// showed it (or the file at its path) is gone, which says nothing of
    /// the file: it is forgotten, so that the next process seen mapping it,
    /// or any of its other users looked at again, asks for it anew.
    pub fn hook_abandoned(&mut self, file: FileId) {
        if !self.is_pending(file) {
            return;
        }
        self.libraries.remove(&file);
        for files in self.by_pid.values_mut() {
            files.retain(|f| *f != file);
        }
    }

    /// A process exited: its libraries lose a user. The libraries in which
    /// it had breakpoints of its own, to be detached.
    pub fn process_exited(&mut self, pid: u32, now_ns: u64) -> Vec<FileId> {
        self.looked_again_ns.remove(&pid);
        self.uids.remove(&pid);
        let mut detach = Vec::new();
        for file in self.by_pid.remove(&pid).unwrap_or_default() {
            if let Some(lib) = self.libraries.get_mut(&file) {
                lib.users.remove(&pid);
                if lib.attached.remove(&pid) {
                    detach.push(file);
                }
                if lib.users.is_empty() {
                    lib.unused_since_ns = Some(now_ns);
                }
            }
        }
        detach
    }

    /// Libraries no observed process has mapped for [`UNUSED_GRACE_NS`]:
    /// forgotten here; those hooked are to be let go (detached, closed).
    pub fn take_unused(&mut self, now_ns: u64) -> Vec<FileId> {
        let unused: Vec<FileId> = self
            .libraries
            .iter()
            .filter(|(_, lib)| {
                lib.unused_since_ns
                    .is_some_and(|since| now_ns.saturating_sub(since) >= UNUSED_GRACE_NS)
            })
            .map(|(file, _)| *file)
            .collect();
        unused
            .into_iter()
            .filter(|file| {
                self.libraries
                    .remove(file)
                    .is_some_and(|lib| matches!(lib.state, HookState::Hooked(_)))
            })
            .collect()
    }

    /// Every library known.
    pub fn status(&self) -> Vec<LibraryStatus> {
        self.libraries
            .iter()
            .map(|(file, lib)| LibraryStatus {
                path: lib.path.clone(),
                inode: file.inode,
                hooked: matches!(lib.state, HookState::Hooked(_)),
                scope: match lib.state {
                    HookState::Hooked(scope) => Some(scope),
                    _ => None,
                },
                refused: match &lib.state {
                    HookState::Hooked(_) | HookState::Pending => None,
                    HookState::Refused(why) => Some(why.clone()),
                    HookState::OverLimit => Some(format!(
                        "more than {MAX_HOOKED_LIBRARIES} distinct TLS library files, \
                         or {MAX_LIBRARIES_PER_USER} first seen in one user's processes"
                    )),
                },
                processes: lib.users.len(),
                processes_hooked: match lib.state {
                    HookState::Hooked(HookScope::File) => lib.users.len(),
                    HookState::Hooked(_) => lib.attached.len(),
                    _ => 0,
                },
            })
            .collect()
    }
}

/// Where a TLS library is probed (entry and return): a file offset, and
/// the hooked function (of `agent_common::TLS_UPROBES`) whose arguments
/// and result the code there has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbePoint {
    pub carries: &'static str,
    pub offset: u64,
}

/// The functions whose offsets [`probe_points`] needs: the four hooked
/// ones, and symbols that only OpenSSL 3.2 and later define.
pub const TLS_SYMBOLS: &[&str] = &[
    "SSL_read",
    "SSL_read_ex",
    "SSL_write",
    "SSL_write_ex",
    "SSL_get_event_timeout",
    "SSL_write_ex2",
    "OSSL_QUIC_client_method",
];

/// Symbols whose presence marks OpenSSL 3.2 or later, whose internal
/// write function takes another argument (flags, for QUIC).
const OPENSSL_3_2_MARKERS: &[&str] = &[
    "SSL_get_event_timeout",
    "SSL_write_ex2",
    "OSSL_QUIC_client_method",
];

/// Bytes of a function read to recognise it.
pub const CODE_BYTES: usize = 64;

/// Where to attach the TLS programs in a library: `symbol` gives a
/// function's file offset, `code` reads bytes at a file offset, and
/// `code_range` is the file range of the section that holds the code.
///
/// Each hooked call costs a breakpoint, and one the kernel must
/// single-step out of line costs a trap more (a VM exit under a
/// hypervisor: 16 us against 0.5 us here, BENCHMARKS.md). OpenSSL's
/// `SSL_read`/`SSL_write` start with `sub $0x18,%rsp`, which is
/// single-stepped; both they and their `_ex` forms call one internal
/// function per direction (`ssl_read_internal(s, buf, num, *readbytes)`,
/// `ssl_write_internal(s, buf, num, *written)` in OpenSSL 1.1.1 to 3.1:
/// exactly the `_ex` forms' arguments and result), which starts with
/// pushes, which the kernel emulates. So where the code shows that shape
/// (the `_ex` form is a bare wrapper whose call the plain form makes too,
/// to a function that starts with a push), the `_ex` programs attach
/// there, once for both forms; anywhere else (OpenSSL 3.2 and later, other
/// builds) on the four public functions.
///
/// Also whether every point is at an instruction the kernel emulates (a
/// push: as Node's own OpenSSL, built with frame pointers, starts even
/// its public functions; see [`HookScope::Auto`]).
pub fn probe_points(
    symbol: impl Fn(&str) -> Option<u64>,
    code: impl Fn(u64, usize) -> Option<Vec<u8>>,
    code_range: Option<(u64, u64)>,
) -> (Vec<ProbePoint>, bool) {
    let newer = OPENSSL_3_2_MARKERS.iter().any(|m| symbol(m).is_some());
    let mut points = Vec::new();
    for (plain, ex) in [("SSL_read", "SSL_read_ex"), ("SSL_write", "SSL_write_ex")] {
        let internal = (!newer)
            .then(|| shared_internal_function(&symbol, &code, code_range?, plain, ex))
            .flatten();
        match internal {
            Some(offset) => points.push(ProbePoint {
                carries: ex,
                offset,
            }),
            None => points.extend([plain, ex].into_iter().filter_map(|function| {
                let offset = symbol(function)?;
                Some(ProbePoint {
                    carries: function,
                    offset,
                })
            })),
        }
    }
    let emulated = !points.is_empty()
        && points
            .iter()
            .all(|p| code(p.offset, 2).is_some_and(|first| starts_with_push(&first)));
    (points, emulated)
}

/// Whether `code` starts with a push of a register (`push %rbp`,
/// `push %r13`), which the kernel emulates instead of single-stepping.
pub fn starts_with_push(code: &[u8]) -> bool {
    matches!(code, [0x50..=0x57, ..] | [0x41, 0x50..=0x57, ..])
}

/// The internal function that both `plain` and `ex` call, when `ex` is a
/// bare wrapper around it (`[endbr64] [sub $imm8,%rsp | push] call rel32`),
/// `plain` calls it within its first bytes, and it starts with a push.
fn shared_internal_function(
    symbol: &impl Fn(&str) -> Option<u64>,
    code: &impl Fn(u64, usize) -> Option<Vec<u8>>,
    (start, end): (u64, u64),
    plain: &str,
    ex: &str,
) -> Option<u64> {
    let within = |offset: u64| (start..end).contains(&offset);
    let ex_at = symbol(ex).filter(|o| within(*o))?;
    let plain_at = symbol(plain).filter(|o| within(*o))?;
    let wrapper = code(ex_at, CODE_BYTES)?;
    let mut i = 0;
    if wrapper.starts_with(&[0xf3, 0x0f, 0x1e, 0xfa]) {
        i += 4;
    }
    match wrapper.get(i..)? {
        [0x48, 0x83, 0xec, _, ..] => i += 4,
        [0x50..=0x57, ..] => i += 1,
        [0x41, 0x50..=0x57, ..] => i += 2,
        _ => {}
    }
    let target = call_target(&wrapper, ex_at, i)?;
    if !within(target) {
        return None;
    }
    let plain_code = code(plain_at, CODE_BYTES)?;
    let plain_calls_it = (0..plain_code.len())
        .any(|j| plain_code[j] == 0xe8 && call_target(&plain_code, plain_at, j) == Some(target));
    (plain_calls_it && starts_with_push(&code(target, 2)?)).then_some(target)
}

/// The target of a `call rel32` at `code[i]`, `code` being at `at`.
fn call_target(code: &[u8], at: u64, i: usize) -> Option<u64> {
    if *code.get(i)? != 0xe8 {
        return None;
    }
    let rel = i32::from_le_bytes(code.get(i + 1..i + 5)?.try_into().ok()?);
    let next = at.checked_add(i as u64 + 5)?;
    next.checked_add_signed(i64::from(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lib(inode: u64, path: &str) -> MappedLibrary {
        MappedLibrary {
            file: FileId {
                dev_major: 8,
                dev_minor: 1,
                inode,
            },
            path: path.to_string(),
        }
    }

    #[test]
    fn names_of_libssl() {
        for yes in [
            "/usr/lib/x86_64-linux-gnu/libssl.so.3",
            "/lib/x86_64-linux-gnu/libssl.so.1.1",
            "/usr/lib/libssl.so",
            "/usr/local/lib/python3.11/dist-packages/psycopg_binary.libs/libssl-6a9b88ec.so.3",
        ] {
            assert!(is_tls_library(yes), "{yes}");
        }
        for no in [
            "/usr/lib/x86_64-linux-gnu/libcrypto.so.3",
            "/usr/lib/libssl3.so",
            "/usr/lib/x86_64-linux-gnu/libssl.so.3 (deleted)",
            "/opt/libsslx.so",
            "/usr/bin/node",
            "libssl-without-so",
            "",
        ] {
            assert!(!is_tls_library(no), "{no}");
        }
    }

    #[test]
    fn one_hook_per_file_whoever_maps_it() {
        let mut libs = TlsLibraries::new(HookScope::File);
        let system = lib(10, "/usr/lib/x86_64-linux-gnu/libssl.so.3");
        assert_eq!(
            libs.process_maps(100, 0, std::slice::from_ref(&system)),
            vec![system.clone()]
        );
        libs.hook_result(system.file, Ok(HookScope::File));
        // Another process, another path to the same file (a container).
        let same = lib(10, "/lib/x86_64-linux-gnu/libssl.so.3");
        assert!(libs.process_maps(200, 0, &[same]).is_empty());
        assert!(libs.hooks_process(100) && libs.hooks_process(200));
        // The same process again: nothing new.
        assert!(libs
            .process_maps(100, 0, std::slice::from_ref(&system))
            .is_empty());
        let status = libs.status();
        assert_eq!(status.len(), 1);
        assert!(status[0].hooked);
        assert_eq!(status[0].processes, 2);
    }

    #[test]
    fn let_go_after_the_last_user_and_the_grace() {
        let mut libs = TlsLibraries::new(HookScope::File);
        let a = lib(10, "/a/libssl.so.3");
        libs.process_maps(100, 0, std::slice::from_ref(&a));
        libs.hook_result(a.file, Ok(HookScope::File));
        libs.process_maps(200, 0, std::slice::from_ref(&a));
        libs.process_exited(100, 1_000);
        assert!(
            libs.take_unused(1_000 + UNUSED_GRACE_NS).is_empty(),
            "200 still maps it"
        );
        libs.process_exited(200, 5_000);
        assert!(libs.take_unused(5_000 + UNUSED_GRACE_NS - 1).is_empty());
        // A new user within the grace keeps it.
        libs.process_maps(300, 0, std::slice::from_ref(&a));
        libs.process_exited(300, 10_000);
        assert_eq!(libs.take_unused(10_000 + UNUSED_GRACE_NS), vec![a.file]);
        assert!(libs.status().is_empty());
        // Seen again: hooked again.
        assert_eq!(libs.process_maps(400, 0, std::slice::from_ref(&a)), vec![a]);
    }

    #[test]
    fn refused_libraries_are_not_tried_again_nor_detached() {
        let mut libs = TlsLibraries::new(HookScope::File);
        let a = lib(10, "/a/libssl.so.3");
        libs.process_maps(100, 0, std::slice::from_ref(&a));
        libs.hook_result(a.file, Err("no symbol SSL_write".into()));
        assert!(!libs.hooks_process(100));
        assert!(libs
            .process_maps(200, 0, std::slice::from_ref(&a))
            .is_empty());
        let status = libs.status();
        assert_eq!(status[0].refused.as_deref(), Some("no symbol SSL_write"));
        libs.process_exited(100, 0);
        libs.process_exited(200, 0);
        assert!(
            libs.take_unused(UNUSED_GRACE_NS).is_empty(),
            "nothing to detach"
        );
        assert!(libs.status().is_empty(), "but forgotten");
    }

    #[test]
    fn one_users_copies_take_only_its_share() {
        let mut libs = TlsLibraries::new(HookScope::File);
        let copies: Vec<MappedLibrary> = (0..MAX_LIBRARIES_PER_USER as u64 + 5)
            .map(|i| lib(i, &format!("/tmp/{i}/libssl.so.3")))
            .collect();
        let hooked = libs.process_maps(666, 1000, &copies);
        assert_eq!(hooked.len(), MAX_LIBRARIES_PER_USER);
        for lib in &hooked {
            libs.hook_result(lib.file, Ok(HookScope::File));
        }
        let status = libs.status();
        assert_eq!(
            status.iter().filter(|s| s.hooked).count(),
            MAX_LIBRARIES_PER_USER
        );
        assert_eq!(status.iter().filter(|s| !s.hooked).count(), 5);
        // Another user's library still gets hooked.
        let real = lib(9999, "/usr/lib/libssl.so.3");
        assert_eq!(
            libs.process_maps(1, 0, std::slice::from_ref(&real)),
            vec![real]
        );
        // When the copies' process is gone, its room comes back.
        libs.process_exited(666, 0);
        libs.take_unused(UNUSED_GRACE_NS);
        let again = lib(1, "/tmp/1/libssl.so.3");
        assert_eq!(
            libs.process_maps(667, 1000, std::slice::from_ref(&again)),
            vec![again]
        );
    }

    #[test]
    fn looked_at_again_at_most_once_per_interval() {
        let mut libs = TlsLibraries::new(HookScope::File);
        assert!(libs.may_look_again(7, 100, 50));
        assert!(!libs.may_look_again(7, 149, 50));
        assert!(libs.may_look_again(7, 150, 50));
        assert!(libs.may_look_again(8, 150, 50), "per process");
        libs.process_exited(7, 160);
        assert!(
            libs.may_look_again(7, 161, 50),
            "a new process under the pid"
        );
    }

    #[test]
    fn no_more_than_the_global_limit() {
        let mut libs = TlsLibraries::new(HookScope::File);
        let mut hooked = 0;
        for user in 0..(MAX_HOOKED_LIBRARIES / MAX_LIBRARIES_PER_USER) as u32 + 2 {
            let copies: Vec<MappedLibrary> = (0..MAX_LIBRARIES_PER_USER as u64)
                .map(|i| {
                    lib(
                        u64::from(user) * 100 + i,
                        &format!("/{user}/{i}/libssl.so.3"),
                    )
                })
                .collect();
            hooked += libs.process_maps(user + 10, user, &copies).len();
        }
        assert_eq!(hooked, MAX_HOOKED_LIBRARIES);
    }

    #[test]
    fn pending_until_the_kernel_side_answers() {
        let mut libs = TlsLibraries::new(HookScope::File);
        let a = lib(10, "/a/libssl.so.3");
        libs.process_maps(100, 0, std::slice::from_ref(&a));
        assert!(libs.is_pending(a.file));
        assert!(!libs.hooks_process(100), "not hooked yet");
        assert!(!libs.status()[0].hooked && libs.status()[0].refused.is_none());
        // Seen by another process meanwhile: asked for once only.
        assert!(libs
            .process_maps(200, 0, std::slice::from_ref(&a))
            .is_empty());
        libs.hook_result(a.file, Ok(HookScope::File));
        assert!(!libs.is_pending(a.file));
        assert!(libs.hooks_process(100) && libs.hooks_process(200));
    }

    #[test]
    fn a_library_whose_process_left_before_it_was_opened_is_asked_for_again() {
        let mut libs = TlsLibraries::new(HookScope::File);
        let a = lib(10, "/usr/lib/libssl.so.3");
        // A short-lived process shows it, and a long-lived one maps it too.
        assert_eq!(
            libs.process_maps(100, 0, std::slice::from_ref(&a)),
            vec![a.clone()]
        );
        assert!(libs
            .process_maps(200, 0, std::slice::from_ref(&a))
            .is_empty());
        libs.hook_abandoned(a.file);
        assert!(libs.status().is_empty(), "not refused: forgotten");
        // The long-lived process looked at again asks for it anew.
        assert_eq!(
            libs.process_maps(200, 0, std::slice::from_ref(&a)),
            vec![a.clone()]
        );
        libs.hook_result(a.file, Ok(HookScope::File));
        assert!(libs.hooks_process(200));
        // An answer already given is not undone.
        libs.hook_abandoned(a.file);
        assert!(libs.hooks_process(200));
    }

    #[test]
    fn process_scope_sets_breakpoints_in_each_observed_process_only() {
        let mut libs = TlsLibraries::new(HookScope::Process);
        let a = lib(10, "/usr/lib/libssl.so.3");
        assert_eq!(
            libs.process_maps(100, 0, std::slice::from_ref(&a)),
            vec![a.clone()],
            "opened once"
        );
        assert!(libs.processes_to_attach().is_empty(), "not held yet");
        libs.process_maps(200, 0, std::slice::from_ref(&a));
        libs.hook_result(a.file, Ok(HookScope::Process));
        let wanted = libs.processes_to_attach();
        assert_eq!(
            wanted,
            vec![
                ProcessHook {
                    file: a.file,
                    pid: 100
                },
                ProcessHook {
                    file: a.file,
                    pid: 200
                }
            ]
        );
        assert!(!libs.hooks_process(100), "held, but no breakpoints yet");
        libs.process_attached(wanted[0], true);
        // 200 exited before its breakpoints were set: no longer a user.
        libs.process_attached(wanted[1], false);
        assert!(libs.hooks_process(100) && !libs.hooks_process(200));
        assert!(libs.processes_to_attach().is_empty());
        let status = libs.status();
        assert_eq!((status[0].processes, status[0].processes_hooked), (1, 1));
        // A later process: attached without opening the file again.
        assert!(libs
            .process_maps(300, 0, std::slice::from_ref(&a))
            .is_empty());
        assert_eq!(
            libs.processes_to_attach(),
            vec![ProcessHook {
                file: a.file,
                pid: 300
            }]
        );
        libs.process_attached(
            ProcessHook {
                file: a.file,
                pid: 300,
            },
            true,
        );
        // Exits: its own breakpoints go; the file stays while 300 lives.
        assert_eq!(libs.process_exited(100, 5), vec![a.file]);
        assert!(libs.take_unused(5 + UNUSED_GRACE_NS).is_empty());
        assert_eq!(libs.process_exited(300, 9), vec![a.file]);
        assert_eq!(libs.take_unused(9 + UNUSED_GRACE_NS), vec![a.file]);
    }

    #[test]
    fn file_scope_needs_no_breakpoints_per_process() {
        let mut libs = TlsLibraries::new(HookScope::File);
        let a = lib(10, "/usr/lib/libssl.so.3");
        libs.process_maps(100, 0, std::slice::from_ref(&a));
        libs.hook_result(a.file, Ok(HookScope::File));
        assert!(libs.processes_to_attach().is_empty());
        assert!(libs.hooks_process(100));
        assert_eq!(libs.status()[0].processes_hooked, 1);
        assert!(
            libs.process_exited(100, 0).is_empty(),
            "nothing per process"
        );
    }

    #[test]
    fn breakpoints_per_process_are_bounded_per_user_and_in_all() {
        let mut libs = TlsLibraries::new(HookScope::Process);
        let a = lib(10, "/usr/lib/libssl.so.3");
        let attach_all = |libs: &mut TlsLibraries| {
            let wanted = libs.processes_to_attach();
            for hook in &wanted {
                libs.process_attached(*hook, true);
            }
            wanted.len()
        };
        // One user's many processes take only its share.
        for pid in 0..MAX_HOOKED_PROCESSES_PER_USER as u32 + 10 {
            libs.process_maps(1000 + pid, 666, std::slice::from_ref(&a));
        }
        libs.hook_result(a.file, Ok(HookScope::Process));
        assert_eq!(attach_all(&mut libs), MAX_HOOKED_PROCESSES_PER_USER);
        assert_eq!(attach_all(&mut libs), 0, "asked again: still none");
        // Another user's process is attached.
        libs.process_maps(50, 1, std::slice::from_ref(&a));
        assert_eq!(
            libs.processes_to_attach(),
            vec![ProcessHook {
                file: a.file,
                pid: 50
            }]
        );
        // In all: no more than the global bound, whoever asks.
        let mut total = MAX_HOOKED_PROCESSES_PER_USER + attach_all(&mut libs);
        for user in 2..=(MAX_HOOKED_PROCESSES / MAX_HOOKED_PROCESSES_PER_USER) as u32 + 1 {
            for i in 0..MAX_HOOKED_PROCESSES_PER_USER as u32 {
                libs.process_maps(user * 100_000 + i, user, std::slice::from_ref(&a));
            }
            total += attach_all(&mut libs);
        }
        assert_eq!(total, MAX_HOOKED_PROCESSES);
        // One of the first user's processes exits: another of its own takes
        // the room.
        assert_eq!(libs.process_exited(1000, 0), vec![a.file]);
        assert_eq!(attach_all(&mut libs), 1);
    }

    /// A code section laid out like Debian's OpenSSL 3.0 (offsets and bytes
    /// as objdump shows them): SSL_read and SSL_read_ex both call
    /// ssl_read_internal, which starts with `push %r13`.
    struct Code {
        bytes: Vec<u8>,
        symbols: Vec<(&'static str, u64)>,
    }

    const BASE: u64 = 0x35000;

    impl Code {
        fn new() -> Self {
            Code {
                bytes: vec![0xcc; 0x1000],
                symbols: Vec::new(),
            }
        }
        fn put(&mut self, at: u64, bytes: &[u8]) {
            let i = (at - BASE) as usize;
            self.bytes[i..i + bytes.len()].copy_from_slice(bytes);
        }
        fn call(&mut self, at: u64, target: u64) {
            let rel = (target as i64 - (at as i64 + 5)) as i32;
            let mut bytes = vec![0xe8];
            bytes.extend_from_slice(&rel.to_le_bytes());
            self.put(at, &bytes);
        }
        fn symbol(&mut self, name: &'static str, at: u64) {
            self.symbols.push((name, at));
        }
        fn points(&self) -> Vec<ProbePoint> {
            self.plan().0
        }
        fn plan(&self) -> (Vec<ProbePoint>, bool) {
            probe_points(
                |name| {
                    self.symbols
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|(_, o)| *o)
                },
                |at, len| {
                    let i = at.checked_sub(BASE)? as usize;
                    self.bytes.get(i..i + len).map(<[u8]>::to_vec)
                },
                Some((BASE, BASE + self.bytes.len() as u64)),
            )
        }
    }

    fn openssl_3_0() -> Code {
        let mut code = Code::new();
        // ssl_read_internal / ssl_write_internal: push %r13 / push %r14.
        code.put(0x35290, &[0x41, 0x55, 0x41, 0x54]);
        code.put(0x355a0, &[0x41, 0x56, 0x41, 0x55]);
        // SSL_read: sub $0x18,%rsp; ...; call ssl_read_internal at +0x1e.
        code.put(0x35430, &[0x48, 0x83, 0xec, 0x18]);
        code.call(0x3544e, 0x35290);
        code.symbol("SSL_read", 0x35430);
        // SSL_read_ex: sub $0x8,%rsp; call ssl_read_internal.
        code.put(0x354c0, &[0x48, 0x83, 0xec, 0x08]);
        code.call(0x354c4, 0x35290);
        code.symbol("SSL_read_ex", 0x354c0);
        code.put(0x35980, &[0x48, 0x83, 0xec, 0x18]);
        code.call(0x3599e, 0x355a0);
        code.symbol("SSL_write", 0x35980);
        code.put(0x35a10, &[0x48, 0x83, 0xec, 0x08]);
        code.call(0x35a14, 0x355a0);
        code.symbol("SSL_write_ex", 0x35a10);
        code
    }

    fn point(carries: &'static str, offset: u64) -> ProbePoint {
        ProbePoint { carries, offset }
    }

    fn public_points(code: &Code) -> Vec<ProbePoint> {
        let at = |name: &str| {
            code.symbols
                .iter()
                .find(|(n, _)| *n == name)
                .expect("a symbol of the layout")
                .1
        };
        ["SSL_read", "SSL_read_ex", "SSL_write", "SSL_write_ex"]
            .map(|name| point(name, at(name)))
            .to_vec()
    }

    #[test]
    fn openssl_3_0_is_hooked_at_its_internal_functions_once_per_direction() {
        assert_eq!(
            openssl_3_0().points(),
            vec![
                point("SSL_read_ex", 0x35290),
                point("SSL_write_ex", 0x355a0)
            ]
        );
        assert!(openssl_3_0().plan().1, "emulated");
        // With endbr64 before the wrapper's sub (a CET build): the same.
        let mut code = openssl_3_0();
        code.put(0x354c0, &[0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x83, 0xec, 0x08]);
        code.call(0x354c8, 0x35290);
        assert_eq!(code.points()[0], point("SSL_read_ex", 0x35290));
    }

    #[test]
    fn anything_else_is_hooked_at_the_public_functions() {
        // OpenSSL 3.2 and later: the internal write takes flags too.
        let mut newer = openssl_3_0();
        newer.symbol("SSL_write_ex2", 0x35b00);
        assert_eq!(newer.plan(), (public_points(&newer), false));
        // An internal function that starts with an instruction the kernel
        // single-steps (no gain, and not the shape this relies on).
        let mut stepped = openssl_3_0();
        stepped.put(0x35290, &[0x48, 0x83, 0xec, 0x38]);
        let points = stepped.points();
        assert_eq!(points[..2], public_points(&stepped)[..2], "reads: public");
        assert_eq!(
            points[2],
            point("SSL_write_ex", 0x355a0),
            "writes: internal"
        );
        // SSL_read does not call what SSL_read_ex calls.
        let mut other = openssl_3_0();
        other.call(0x3544e, 0x355a0);
        assert_eq!(other.points()[..2], public_points(&other)[..2]);
        // SSL_read_ex is no bare wrapper (e.g. LTO inlined the internal).
        let mut inlined = openssl_3_0();
        inlined.put(0x354c4, &[0x48, 0x89, 0xfb, 0x90, 0x90]);
        assert_eq!(inlined.points()[..2], public_points(&inlined)[..2]);
        // A call out of the code section.
        let mut outside = openssl_3_0();
        outside.call(0x354c4, 0x90000);
        assert_eq!(outside.points()[..2], public_points(&outside)[..2]);
        // Node's own OpenSSL: no wrapper shape, but every public function
        // starts with `push %rbp`: public points, emulated all the same.
        let mut node = Code::new();
        for (name, at) in [
            ("SSL_read", 0x35180),
            ("SSL_read_ex", 0x35340),
            ("SSL_write", 0x35940),
            ("SSL_write_ex", 0x35b20),
        ] {
            node.put(at, &[0x55, 0x48, 0x89, 0xe5]);
            node.symbol(name, at);
        }
        assert_eq!(node.plan(), (public_points(&node), true));
        // OpenSSL before 1.1.1: no _ex forms, the plain ones only.
        let mut old = Code::new();
        old.symbol("SSL_read", 0x35430);
        old.symbol("SSL_write", 0x35980);
        assert_eq!(
            old.points(),
            vec![point("SSL_read", 0x35430), point("SSL_write", 0x35980)]
        );
    }

    #[test]
    fn auto_scope_is_per_file_by_where_the_probes_sit() {
        let auto = TlsLibraries::new(HookScope::Auto);
        assert_eq!(auto.scope_for(true), HookScope::File);
        assert_eq!(auto.scope_for(false), HookScope::Process);
        assert_eq!(
            TlsLibraries::new(HookScope::File).scope_for(false),
            HookScope::File
        );
        assert_eq!(
            TlsLibraries::new(HookScope::Process).scope_for(true),
            HookScope::Process
        );
        // Two files in one agent, each in its own scope.
        let mut libs = TlsLibraries::new(HookScope::Auto);
        let emulated = lib(10, "/usr/lib/libssl.so.3");
        let stepped = lib(20, "/opt/app/libssl.so.3");
        libs.process_maps(100, 0, &[emulated.clone(), stepped.clone()]);
        libs.hook_result(emulated.file, Ok(libs.scope_for(true)));
        libs.hook_result(stepped.file, Ok(libs.scope_for(false)));
        assert_eq!(
            libs.processes_to_attach(),
            vec![ProcessHook {
                file: stepped.file,
                pid: 100
            }],
            "only the stepped file needs breakpoints per process"
        );
        assert!(
            libs.hooks_process(100),
            "the emulated file covers it already"
        );
        assert_eq!(libs.process_exited(100, 0), Vec::<FileId>::new());
    }
}
