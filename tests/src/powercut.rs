//! A FUSE file system that forgets, on command, everything not yet made durable: the power-loss
//! harness of the crash tests.
//!
//! Everything lives in memory. A file's bytes become durable at its `fsync`/`fdatasync`; a
//! directory's entries (creations, renames, links, unlinks) at the `fsync` of that directory.
//! [`PowerCut::cut`] unmounts, turns every directory back into its last synced entries and
//! every file into its last synced bytes (a file never synced is empty; one no synced entry
//! reaches is gone), and mounts again, as a machine that lost power and rebooted would see its
//! disk. Unlike LazyFS, directory entries are tracked too, so a missing directory fsync is
//! caught. `syncfs(2)` does not reach a FUSE server: a writer relying on it cannot be tested
//! here (and must not be chosen on such a file system).
//!
//! It is not: a faithful model of any one file system's reordering (ext4 may persist more than
//! was synced; this keeps exactly what was), nor fast.

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

const ROOT: u64 = 1;
/// No kernel caching of names or attributes: after a cut the kernel must ask again.
const TTL: Duration = Duration::ZERO;

#[derive(Clone)]
enum Content {
    File {
        data: Vec<u8>,
        synced: Vec<u8>,
    },
    /// A unix socket's name (the daemon's admin socket): only the directory entry matters.
    Socket,
    Dir {
        entries: BTreeMap<OsString, u64>,
        synced: BTreeMap<OsString, u64>,
    },
}

#[derive(Clone)]
struct Node {
    content: Content,
    mode: u16,
}

/// The file system's state, shared between the mounted sessions and the test.
#[derive(Default)]
struct Model {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    /// Counts of the calls that make things durable, for the test's report.
    file_syncs: u64,
    dir_syncs: u64,
}

impl Model {
    fn new() -> Model {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                content: Content::Dir {
                    entries: BTreeMap::new(),
                    synced: BTreeMap::new(),
                },
                mode: 0o755,
            },
        );
        Model {
            nodes,
            next_ino: ROOT + 1,
            ..Default::default()
        }
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let n = self.nodes.get(&ino)?;
        let (kind, size, nlink) = match &n.content {
            Content::File { data, .. } => (FileType::RegularFile, data.len() as u64, 1),
            Content::Dir { .. } => (FileType::Directory, 0, 2),
            Content::Socket => (FileType::Socket, 0, 1),
        };
        let now = SystemTime::now();
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind,
            perm: n.mode,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn entries(&mut self, dir: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match self.nodes.get_mut(&dir).map(|n| &mut n.content) {
            Some(Content::Dir { entries, .. }) => Ok(entries),
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn data(&mut self, ino: u64) -> Result<&mut Vec<u8>, Errno> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.content) {
            Some(Content::File { data, .. }) => Ok(data),
            Some(Content::Socket) => Err(Errno::EINVAL),
            Some(_) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn add(
        &mut self,
        parent: u64,
        name: &OsStr,
        content: Content,
        mode: u16,
    ) -> Result<u64, Errno> {
        let ino = self.next_ino;
        let entries = self.entries(parent)?;
        if entries.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        entries.insert(name.to_os_string(), ino);
        self.next_ino += 1;
        self.nodes.insert(ino, Node { content, mode });
        Ok(ino)
    }

    /// Adds a node and returns its attributes, for the reply.
    fn add_attr(
        &mut self,
        parent: u64,
        name: &OsStr,
        content: Content,
        mode: u32,
    ) -> Result<FileAttr, Errno> {
        let ino = self.add(parent, name, content, (mode & 0o7777) as u16)?;
        self.attr(ino).ok_or(Errno::EIO)
    }

    /// Power lost: only what was synced, reachable through synced entries, remains.
    fn cut(&mut self) {
        let mut reachable = HashSet::new();
        let mut todo = vec![ROOT];
        while let Some(ino) = todo.pop() {
            if !reachable.insert(ino) {
                continue;
            }
            let Some(node) = self.nodes.get_mut(&ino) else {
                continue;
            };
            match &mut node.content {
                Content::File { data, synced } => *data = synced.clone(),
                Content::Socket => {}
                Content::Dir { entries, synced } => {
                    // An entry whose inode no longer exists cannot be: dropped.
                    *entries = synced.clone();
                    todo.extend(entries.values().copied());
                }
            }
        }
        self.nodes.retain(|ino, _| reachable.contains(ino));
        for node in self.nodes.values_mut() {
            if let Content::Dir { entries, synced } = &mut node.content {
                let live: Vec<OsString> = entries.keys().cloned().collect();
                for name in live {
                    if !reachable.contains(&entries[&name]) {
                        entries.remove(&name);
                        synced.remove(&name);
                    }
                }
            }
        }
    }
}

/// The mounted file system (one FUSE session).
struct PowerCutFs(Arc<Mutex<Model>>);

impl PowerCutFs {
    fn model(&self) -> MutexGuard<'_, Model> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Filesystem for PowerCutFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut m = self.model();
        let found = m.entries(parent.0).map(|e| e.get(name).copied());
        match found {
            Ok(Some(ino)) => match m.attr(ino) {
                Some(a) => reply.entry(&TTL, &a, Generation(0)),
                None => reply.error(Errno::ENOENT),
            },
            Ok(None) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.model().attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut m = self.model();
        if let Some(size) = size {
            match m.data(ino.0) {
                Ok(d) => d.resize(size as usize, 0),
                Err(e) => return reply.error(e),
            }
        }
        if let (Some(mode), Some(n)) = (mode, m.nodes.get_mut(&ino.0)) {
            n.mode = (mode & 0o7777) as u16;
        }
        match m.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let mut m = self.model();
        let dir = Content::Dir {
            entries: BTreeMap::new(),
            synced: BTreeMap::new(),
        };
        match m.add_attr(parent.0, name, dir, mode) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let content = match mode & libc::S_IFMT {
            libc::S_IFSOCK => Content::Socket,
            libc::S_IFREG => Content::File {
                data: Vec::new(),
                synced: Vec::new(),
            },
            _ => return reply.error(Errno::EOPNOTSUPP),
        };
        let mut m = self.model();
        match m.add_attr(parent.0, name, content, mode) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut m = self.model();
        let file = Content::File {
            data: Vec::new(),
            synced: Vec::new(),
        };
        match m.add_attr(parent.0, name, file, mode) {
            Ok(a) => reply.created(&TTL, &a, Generation(0), FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut m = self.model();
        match m.entries(parent.0).map(|e| e.remove(name)) {
            Ok(Some(_)) => reply.ok(),
            Ok(None) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut m = self.model();
        let Ok(Some(&ino)) = m.entries(parent.0).map(|e| e.get(name)) else {
            return reply.error(Errno::ENOENT);
        };
        match m.entries(ino) {
            Ok(e) if !e.is_empty() => return reply.error(Errno::ENOTEMPTY),
            Ok(_) => {}
            Err(e) => return reply.error(e),
        }
        let _ = m.entries(parent.0).map(|e| e.remove(name));
        reply.ok();
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut m = self.model();
        let ino = match m.entries(parent.0).map(|e| e.remove(name)) {
            Ok(Some(ino)) => ino,
            Ok(None) => return reply.error(Errno::ENOENT),
            Err(e) => return reply.error(e),
        };
        match m.entries(newparent.0) {
            Ok(e) => {
                e.insert(newname.to_os_string(), ino);
                reply.ok()
            }
            Err(err) => {
                let _ = m
                    .entries(parent.0)
                    .map(|e| e.insert(name.to_os_string(), ino));
                reply.error(err)
            }
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let mut m = self.model();
        match m.entries(newparent.0) {
            Ok(e) if e.contains_key(newname) => return reply.error(Errno::EEXIST),
            Ok(e) => {
                e.insert(newname.to_os_string(), ino.0);
            }
            Err(e) => return reply.error(e),
        }
        match m.attr(ino.0) {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let mut m = self.model();
        match m.data(ino.0) {
            Ok(d) => {
                let start = (offset as usize).min(d.len());
                let end = (start + size as usize).min(d.len());
                reply.data(&d[start..end]);
            }
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut m = self.model();
        match m.data(ino.0) {
            Ok(d) => {
                let end = offset as usize + data.len();
                if d.len() < end {
                    d.resize(end, 0);
                }
                d[offset as usize..end].copy_from_slice(data);
                reply.written(data.len() as u32);
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut m = self.model();
        match m.nodes.get_mut(&ino.0).map(|n| &mut n.content) {
            Some(Content::File { data, synced }) => *synced = data.clone(),
            Some(Content::Dir { entries, synced }) => *synced = entries.clone(),
            Some(Content::Socket) => {}
            None => return reply.error(Errno::ENOENT),
        }
        m.file_syncs += 1;
        reply.ok();
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut m = self.model();
        let listed: Vec<(OsString, u64)> = match m.entries(ino.0) {
            Ok(e) => e.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            Err(e) => return reply.error(e),
        };
        let all = [(OsString::from("."), ino.0), (OsString::from(".."), ROOT)]
            .into_iter()
            .chain(listed);
        for (i, (name, child)) in all.enumerate().skip(offset as usize) {
            let kind = match m.nodes.get(&child).map(|n| &n.content) {
                Some(Content::Dir { .. }) | None => FileType::Directory,
                Some(Content::File { .. }) => FileType::RegularFile,
                Some(Content::Socket) => FileType::Socket,
            };
            if reply.add(INodeNo(child), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut m = self.model();
        match m.nodes.get_mut(&ino.0).map(|n| &mut n.content) {
            Some(Content::Dir { entries, synced }) => *synced = entries.clone(),
            Some(_) => return reply.error(Errno::ENOTDIR),
            None => return reply.error(Errno::ENOENT),
        }
        m.dir_syncs += 1;
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // Plenty of room: the daemon refuses mail when space is low.
        reply.statfs(1 << 24, 1 << 24, 1 << 24, 1 << 20, 1 << 20, 4096, 255, 4096);
    }
}

/// A mounted power-cut file system; unmounted when dropped.
pub struct PowerCut {
    model: Arc<Mutex<Model>>,
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl PowerCut {
    /// Mounts an empty file system at `mountpoint` (needs `/dev/fuse` and `fusermount3`, or
    /// root).
    pub fn mount(mountpoint: &Path) -> std::io::Result<PowerCut> {
        let mut fs = PowerCut {
            model: Arc::new(Mutex::new(Model::new())),
            mountpoint: mountpoint.to_path_buf(),
            session: None,
        };
        fs.mount_again()?;
        Ok(fs)
    }

    fn mount_again(&mut self) -> std::io::Result<()> {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("powercut".into()),
            MountOption::DefaultPermissions,
        ];
        config.n_threads = Some(4);
        let fs = PowerCutFs(self.model.clone());
        self.session = Some(fuser::spawn_mount(fs, &self.mountpoint, &config)?);
        Ok(())
    }

    /// Power lost and back: unmount (every process using the file system must be dead), keep
    /// only what was synced, mount again.
    pub fn cut(&mut self) -> std::io::Result<()> {
        self.wait_until_idle();
        if let Some(s) = self.session.take() {
            s.umount_and_join()?;
        }
        self.model.lock().unwrap_or_else(|p| p.into_inner()).cut();
        self.mount_again()
    }

    /// Waits (up to 10 s) until nothing holds the mount: a killed process's io_uring ring is
    /// torn down after the process is gone, holding its files a little longer, and unmounting
    /// meanwhile fails with EBUSY. `MNT_EXPIRE` only asks: EBUSY while in use, EAGAIN (marked
    /// for expiry, not unmounted) once idle.
    fn wait_until_idle(&self) {
        use std::os::unix::ffi::OsStrExt;
        let Ok(path) = std::ffi::CString::new(self.mountpoint.as_os_str().as_bytes()) else {
            return;
        };
        for _ in 0..200 {
            // SAFETY: umount2 with a valid C string; MNT_EXPIRE never unmounts on first call.
            let rc = unsafe { libc::umount2(path.as_ptr(), libc::MNT_EXPIRE) };
            let busy =
                rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EBUSY);
            if !busy {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// (file fsyncs, directory fsyncs) served so far.
    pub fn syncs(&self) -> (u64, u64) {
        let m = self.model.lock().unwrap_or_else(|p| p.into_inner());
        (m.file_syncs, m.dir_syncs)
    }
}

impl Drop for PowerCut {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
    }
}
