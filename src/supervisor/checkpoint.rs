//! Checkpoints through the runtime and CRIU, kept where this API's clients expect them:
//! `<bundle>/checkpoints/<name>`, with a small metadata file beside the images recording the
//! flags and the time so List answers truthfully. One turn per bundle keeps two containers
//! that share a bundle from racing on the same directory in a dump, and one turn per checkpoint
//! directory (device and inode) keeps two restores from holding the same one; restores of
//! different checkpoints run side by side. The checkpoint directories berthd
//! takes from their owners while it works in them are written down in the state directory
//! ([`HeldLedger`]), so a berthd killed meanwhile gives them back when it starts again.
//! Does not own: the Checkpoint record (model), the argv (runtime), restoring (create).

use std::collections::HashMap;
use std::io::{Read, Seek, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use rustix::fs::{Mode, OFlags};

use super::Supervisor;
use super::caller::Caller;
use crate::client_fs::shown;
use crate::client_fs::{self, Peer};
use crate::error::{Error, Result};
use crate::events::EventKind;
use crate::model::Checkpoint;
use crate::runtime::{Asker, CriuOptions, Operation};

/// The file beside the images that records how a checkpoint was taken.
const METADATA: &str = "berth-checkpoint.json";
/// The most entries a checkpoint to restore may hold: CRIU writes a few files per process.
const MAX_IMAGE_FILES: usize = 100_000;

/// The CRIU options a checkpoint is dumped and restored with.
fn criu_options(checkpoint: &Checkpoint) -> CriuOptions {
    CriuOptions {
        leave_running: !checkpoint.exit,
        tcp_established: checkpoint.tcp,
        external_unix_sockets: checkpoint.unix_sockets,
        shell_job: checkpoint.shell,
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Metadata {
    #[serde(flatten)]
    checkpoint: Checkpoint,
    /// Seconds since the epoch.
    created: u64,
}

/// `^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`: a plain directory name under `checkpoints/`.
pub fn validate_name(name: &str) -> Result<()> {
    if super::validate::plain_name(name, 128) {
        Ok(())
    } else if name.is_empty() {
        Err(Error::InvalidArgument(
            "checkpoint name is empty: give the checkpoint's name".into(),
        ))
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid checkpoint name {}: use 1 to 128 letters, digits, '_', '.' or '-', starting with a letter or digit",
            crate::error::quote(name)
        )))
    }
}

fn checkpoints_dir(bundle: &Path) -> PathBuf {
    bundle.join("checkpoints")
}

/// Checkpoint `name` of `bundle` as errors show it.
fn shown_checkpoint(bundle: &Path, name: &str) -> String {
    shown(&checkpoints_dir(bundle).join(name))
}

/// How many checkpoint directories berthd lists in one bundle.
const MAX_CHECKPOINTS: usize = 4096;

/// `checkpoints/<name>` inside a bundle.
fn relative(name: &str) -> PathBuf {
    Path::new("checkpoints").join(name)
}

/// The most a checkpoint's metadata may take: what berthd writes is about 150 octets. A larger
/// file is not berthd's, and 4096 checkpoints of a bundle are listed at most, so a listing
/// reads 16 MiB at most, not 4096 client files of `--client-file-max-bytes` each.
const MAX_METADATA_BYTES: u64 = 4096;

/// Reads how the checkpoint `name` was taken from its metadata at `metadata` beneath `dir`
/// (the bundle, or the checkpoint itself), as `peer` may read it. A directory made by hand or by
/// another tool has no metadata, or one that is not berthd's: it is listed with its name and no
/// flags.
fn read_checkpoint(dir: &OwnedFd, metadata: &Path, name: &str, peer: &Peer) -> Checkpoint {
    let read = |fd: OwnedFd| {
        let st = rustix::fs::fstat(&fd).ok()?;
        if st.st_size as u64 > MAX_METADATA_BYTES {
            return None;
        }
        let mut bytes = Vec::new();
        std::fs::File::from(fd)
            .take(MAX_METADATA_BYTES + 1)
            .read_to_end(&mut bytes)
            .ok()?;
        (bytes.len() as u64 <= MAX_METADATA_BYTES).then_some(bytes)
    };
    client_fs::open_beneath(dir, metadata, OFlags::RDONLY | OFlags::NONBLOCK, peer)
        .ok()
        .and_then(read)
        .and_then(|bytes| serde_json::from_slice::<Metadata>(&bytes).ok())
        .map(|m| Checkpoint {
            name: name.to_owned(),
            ..m.checkpoint
        })
        .unwrap_or_else(|| Checkpoint {
            name: name.to_owned(),
            ..Checkpoint::default()
        })
}

/// The checkpoints of a bundle, by name: the real directories beneath it, no link followed.
pub async fn list(caller: &Caller, bundle: &Path) -> Result<Vec<Checkpoint>> {
    let fd = caller.open_dir("bundle", bundle).await?;
    let peer = caller.peer.clone();
    caller
        .off_reactor("listing checkpoints", move || {
            let names = client_fs::list_dirs_beneath(
                &fd,
                Path::new("checkpoints"),
                &peer,
                MAX_CHECKPOINTS,
            )?;
            Ok(names
                .iter()
                .filter(|name| validate_name(name).is_ok())
                .map(|name| {
                    let metadata = relative(name).join(METADATA);
                    read_checkpoint(&fd, &metadata, name, &peer)
                })
                .collect())
        })
        .await
}

/// Where berthd writes down each checkpoint directory it has taken from its owner, for as long
/// as it holds it: a restore's, root's 0700 while CRIU reads it, and a dump's, root's until it
/// is given to its caller. A berthd killed meanwhile finds them at its next start
/// ([`HeldLedger::give_back_all`]): a restore's goes back to its owner and mode, an unfinished
/// dump is removed, and a finished one is given to its caller with its metadata, as the dump
/// would have. One file per directory in `<state-dir>/held`, named by its device and inode.
/// Until that is done, nothing is taken: a restore or a dump is UNAVAILABLE.
#[derive(Debug, Clone)]
pub struct HeldLedger {
    dir: PathBuf,
    /// Set until [`HeldLedger::give_back_all`] is done.
    giving_back: Arc<AtomicBool>,
}

/// A directory berthd holds, as written down.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct HeldEntry {
    bundle: PathBuf,
    name: String,
    dev: u64,
    ino: u64,
    held: Held,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Held {
    /// A restore's: given back to this owner and mode.
    Restore { uid: u32, gid: u32, mode: u32 },
    /// A dump's for the caller `uid`/`gid`: removed while unfinished (CRIU may have stopped
    /// half-way); once finished, given to the caller with `checkpoint` as its metadata.
    Dump {
        uid: u32,
        gid: u32,
        checkpoint: Checkpoint,
        finished: bool,
    },
}

/// An entry and its file, removed once what it names is back with its owner.
#[derive(Debug)]
struct HeldEntryFile {
    path: PathBuf,
    entry: HeldEntry,
}

impl HeldEntryFile {
    /// Writes down that the dump is done: from here on, a restarted berthd finishes giving it
    /// to its caller instead of removing it.
    fn finish_dump(&mut self) -> Result<()> {
        if let Held::Dump { finished, .. } = &mut self.entry.held {
            *finished = true;
        }
        write_entry(&self.path, &self.entry)
    }

    fn remove(&self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            let e = Error::io(&self.path, e);
            tracing::warn!(error = %e, "a held checkpoint's entry was not removed");
        }
    }
}

/// The most an entry's file may take: what berthd writes is a few hundred octets.
const MAX_ENTRY_BYTES: u64 = 64 * 1024;

/// Writes an entry's file whole, as the store writes a record.
fn write_entry(path: &Path, entry: &HeldEntry) -> Result<()> {
    let bytes = serde_json::to_vec(entry)
        .map_err(|e| Error::Internal(format!("encode a held checkpoint's entry: {e}")))?;
    crate::store::write_atomically(&path.with_extension("tmp"), path, &bytes)
}

impl HeldLedger {
    /// The ledger in `<state_dir>/held`; it takes nothing until
    /// [`HeldLedger::give_back_all`] has run.
    pub fn in_state_dir(state_dir: &Path) -> HeldLedger {
        HeldLedger {
            dir: state_dir.join("held"),
            giving_back: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Writes `entry` down before the directory is taken (for a dump, right after it is made
    /// root's).
    fn write(&self, entry: HeldEntry) -> Result<HeldEntryFile> {
        if self.giving_back.load(Ordering::Acquire) {
            return Err(Error::Unavailable(
                "berthd is still giving back the checkpoints it held when it stopped; retry \
                 shortly"
                    .into(),
            ));
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&self.dir)
            .map_err(|e| Error::io(&self.dir, e))?;
        let path = self.dir.join(format!("{}-{}.json", entry.dev, entry.ino));
        write_entry(&path, &entry)?;
        Ok(HeldEntryFile { path, entry })
    }

    /// Gives back every directory a berthd killed while holding it left behind, once: given
    /// back or not, its entry is done with. Runs at start, off the reactor (the directories are
    /// the clients'), bounded: the entries are read first, so a hold that a request makes after
    /// the bound is not among them.
    pub fn give_back_all(&self) {
        self.give_back_entries();
        self.giving_back.store(false, Ordering::Release);
    }

    fn give_back_entries(&self) {
        let files = match std::fs::read_dir(&self.dir) {
            Ok(files) => files,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                let e = Error::io(&self.dir, e);
                tracing::warn!(error = %e, "the checkpoints held when berthd stopped are not known");
                return;
            }
        };
        let mut entries = Vec::new();
        for file in files.flatten() {
            let path = file.path();
            if path.extension().is_some_and(|ext| ext == "json") {
                match read_entry(&path) {
                    Ok(entry) => entries.push((path, entry)),
                    Err(e) => {
                        tracing::warn!(error = %e, "an unreadable held checkpoint entry");
                        let _ = std::fs::remove_file(&path);
                    }
                }
            } else {
                // A temp file: an entry never written whole. Its restore had not taken the
                // directory yet; its dump's directory, just made, is empty and the caller's to
                // remove.
                let _ = std::fs::remove_file(&path);
            }
        }
        for (path, (entry, bytes)) in entries {
            let checkpoint = shown_checkpoint(&entry.bundle, &entry.name);
            match give_back_entry(&entry, &self.dir) {
                Ok(what) => tracing::info!(
                    checkpoint,
                    "a checkpoint held when berthd stopped was {what}"
                ),
                Err(e) => tracing::warn!(
                    checkpoint,
                    error = %e,
                    "a checkpoint held when berthd stopped was left as it is"
                ),
            }
            // Unless a hold wrote it again meanwhile.
            if crate::store::read_state_file(&path, MAX_ENTRY_BYTES).is_ok_and(|now| now == bytes) {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// An entry and its bytes as read.
fn read_entry(path: &Path) -> Result<(HeldEntry, Vec<u8>)> {
    let bytes = crate::store::read_state_file(path, MAX_ENTRY_BYTES)?;
    let entry = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
    Ok((entry, bytes))
}

/// Gives one held directory back, if what `<bundle>/checkpoints/<name>` names now is still the
/// directory berthd held (its device and inode) and still root's: a client may have renamed,
/// removed or replaced it since, and then nothing of it is berthd's to touch. Says what became
/// of it.
fn give_back_entry(entry: &HeldEntry, ledger: &Path) -> Result<&'static str> {
    validate_name(&entry.name)?;
    let root = Peer::root();
    let shown = shown_checkpoint(&entry.bundle, &entry.name);
    let state_dir = ledger.parent().unwrap_or(ledger);
    let bundle = client_fs::open_dir("bundle", &entry.bundle, &root, &[state_dir])?;
    let image_path = relative(&entry.name);
    let dir = OFlags::RDONLY | OFlags::DIRECTORY;
    let image = client_fs::open_beneath(&bundle, &image_path, dir, &root)?;
    let st = rustix::fs::fstat(&image).map_err(|e| Error::io(&shown, e.into()))?;
    if (st.st_dev, st.st_ino) != (entry.dev, entry.ino) || st.st_uid != 0 {
        return Err(Error::FailedPrecondition(format!(
            "{shown} is no longer the directory berthd held"
        )));
    }
    match &entry.held {
        Held::Restore { uid, gid, mode } => client_fs::set_owner(&image, (*uid, *gid), *mode)
            .map(|()| "given back to its owner")
            .map_err(|e| Error::io(&shown, e.into())),
        Held::Dump {
            uid,
            gid,
            checkpoint,
            finished,
        } => {
            // CRIU writes its inventory once every image is: a dump berthd died waiting for
            // may have finished, and with `exit` its container is gone, the images all that is
            // left of it.
            if !finished && !dumped_whole(&image) {
                client_fs::remove_held(&bundle, &image_path, image)?;
                return Ok("removed: its dump was cut off half-way");
            }
            // Written already if berthd was killed between that and the giving.
            match write_metadata(&image, checkpoint) {
                Err(Error::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::AlreadyExists => {}
                written => written?,
            }
            let caller = Peer {
                pid: 0,
                uid: *uid,
                gid: *gid,
                groups: Vec::new(),
            };
            client_fs::give_to(&image, &shown, &caller)?;
            Ok("given to its caller: its dump had finished")
        }
    }
}

/// Whether CRIU finished dumping into `image`: the inventory, which it writes once every other
/// image is written, is there.
fn dumped_whole(image: &OwnedFd) -> bool {
    rustix::fs::statat(
        image,
        "inventory.img",
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .is_ok_and(|st| {
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
    })
}

/// A checkpoint a create restores from: its directory, held open, and the CRIU options its
/// metadata records. Its files are checked when the restore [`hold`]s it.
pub struct Restorable {
    image: OwnedFd,
    shown: String,
    bundle: PathBuf,
    name: String,
    pub options: CriuOptions,
    /// This checkpoint's turn: a second restore of the same directory, under whatever name,
    /// must find it its owner's again. Shared with the [`HeldImage`], so it ends only once the
    /// directory is given back, even where that finishes after its request gave up.
    turn: Arc<tokio::sync::OwnedMutexGuard<()>>,
}

/// Refuses a restore by anyone but the checkpoint's owner (or root): taking it changes its
/// owner, which nobody else may do.
fn owner_only(shown: &str, owner: u32, peer: &Peer) -> Result<()> {
    if peer.is_root() || owner == peer.uid {
        return Ok(());
    }
    Err(Error::PermissionDenied(format!(
        "checkpoint {shown} belongs to uid {owner}, not to uid {}: a restore takes the \
         checkpoint for its duration, so only its owner may restore from it",
        peer.uid
    )))
}

/// The restores' turns, by checkpoint directory (device and inode): restores of different
/// checkpoints run side by side.
pub type RestoreTurns = Turns<Option<(u64, u64)>>;

/// Checkpoint `name` of `bundle`, to restore, once its turn among `turns` has come. A dump
/// into the bundle (its turn among `dumps`) ends first: until it has, its directory is no
/// checkpoint. That turn is let go of before this one is waited for, so a restore waiting for
/// another of its checkpoint holds up nothing else of the bundle.
pub async fn for_restore(
    caller: &Caller,
    bundle: &Path,
    name: &str,
    turns: &RestoreTurns,
    dumps: &Turns<PathBuf>,
) -> Result<Restorable> {
    validate_name(name)?;
    let dumped = dumps.take(bundle.to_owned()).await;
    let fd = Arc::new(caller.open_dir("bundle", bundle).await?);
    // Which directory the name leads to, before it is opened as the caller: while another
    // restore holds it, root's, the caller could not open it. A name that leads nowhere shares
    // one turn; the open below says why.
    let (looked_up, owned_name) = (Arc::clone(&fd), name.to_owned());
    let key = caller
        .off_reactor("finding the checkpoint", move || {
            Ok(client_fs::dir_id_beneath(
                &looked_up,
                &relative(&owned_name),
            ))
        })
        .await?;
    drop(dumped);
    let turn = turns.take(key).await;
    let (peer, owned_name) = (caller.peer.clone(), name.to_owned());
    let missing = format!(
        "checkpoint {name} does not exist in {}",
        shown(&checkpoints_dir(bundle))
    );
    let shown_image = shown_checkpoint(bundle, name);
    let (image, checkpoint) = caller
        .off_reactor("reading the checkpoint", move || {
            let dir = OFlags::RDONLY | OFlags::DIRECTORY;
            let image = match client_fs::open_beneath(&fd, &relative(&owned_name), dir, &peer) {
                Ok(image) => image,
                Err(Error::NotFound(_)) => return Err(Error::NotFound(missing)),
                Err(e) => return Err(e),
            };
            let st = rustix::fs::fstat(&image).map_err(|e| Error::io(&shown_image, e.into()))?;
            // Here, not when the restore takes it: a request refused anyway must not keep the
            // owner's restores waiting while the rest of its create is prepared.
            owner_only(&shown_image, st.st_uid, &peer)?;
            if key != Some((st.st_dev, st.st_ino)) {
                return Err(Error::FailedPrecondition(format!(
                    "{shown_image} was replaced while berthd opened it; do not move checkpoints \
                     while restoring from them, and try again"
                )));
            }
            client_fs::checkpoint_dir_not_on_fuse(&image, &shown_image)?;
            let metadata = Path::new(METADATA);
            let checkpoint = read_checkpoint(&image, metadata, &owned_name, &peer);
            Ok((image, checkpoint))
        })
        .await?;
    Ok(Restorable {
        image,
        shown: shown_checkpoint(bundle, name),
        bundle: bundle.to_owned(),
        name: name.to_owned(),
        options: criu_options(&checkpoint),
        turn: Arc::new(turn),
    })
}

/// A checkpoint being restored, made root's (0700) for as long as CRIU reads it: its owner can
/// then put nothing in it for CRIU to follow (CRIU also writes `stats-restore` there), and its
/// files are checked once that is so. Dropping it returns its owner and mode, wherever that
/// happens ([`give_back`], or the blocking pool when a hold finishes after its request gave
/// up), so the owner does not lose it to root. A berthd killed during a restore gives it back
/// when it starts again ([`HeldLedger`]).
pub struct HeldImage {
    dir: OwnedFd,
    shown: String,
    owner: (u32, u32),
    mode: u32,
    /// Its entry in the [`HeldLedger`], removed once it is given back.
    entry: HeldEntryFile,
    /// Its restore's turn, dropped after the give-back ([`Drop`] runs before the fields'
    /// drops).
    _turn: Arc<tokio::sync::OwnedMutexGuard<()>>,
}

impl HeldImage {
    /// The name by which the runtime reaches this directory and no other.
    pub fn path(&self) -> PathBuf {
        client_fs::held_path(&self.dir)
    }
}

impl Drop for HeldImage {
    fn drop(&mut self) {
        match client_fs::set_owner(&self.dir, self.owner, self.mode) {
            Ok(()) => self.entry.remove(),
            // The entry stays: the next start of berthd tries again.
            Err(e) => {
                let e = Error::io(&self.shown, e.into());
                tracing::warn!(error = %e, "a restored checkpoint was not given back to its owner");
            }
        }
    }
}

/// Holds the checkpoint `restorable` for a restore by `caller`, who must own it: taking it
/// changes its owner, which nobody else may do. Every file in it must be one the caller may read
/// ([`client_fs::check_readable_files`]).
pub async fn hold(
    caller: &Caller,
    restorable: &Restorable,
    ledger: &HeldLedger,
) -> Result<HeldImage> {
    let dir = restorable
        .image
        .try_clone()
        .map_err(|e| Error::sys("duplicate the checkpoint's descriptor", e))?;
    let (shown, peer) = (restorable.shown.clone(), caller.peer.clone());
    let (bundle, name, ledger, turn) = (
        restorable.bundle.clone(),
        restorable.name.clone(),
        ledger.clone(),
        Arc::clone(&restorable.turn),
    );
    caller
        .off_reactor("taking the checkpoint for the restore", move || {
            let io = |e: rustix::io::Errno| Error::io(&shown, e.into());
            let st = rustix::fs::fstat(&dir).map_err(io)?;
            let (owner, mode) = ((st.st_uid, st.st_gid), st.st_mode & 0o7777);
            let entry = ledger.write(HeldEntry {
                bundle,
                name,
                dev: st.st_dev,
                ino: st.st_ino,
                held: Held::Restore {
                    uid: owner.0,
                    gid: owner.1,
                    mode,
                },
            })?;
            // Made before the directory is taken: a take that half fails (owner changed, mode
            // not) is given back by its drop all the same.
            let held = HeldImage {
                dir,
                shown: shown.clone(),
                owner,
                mode,
                entry,
                _turn: turn,
            };
            client_fs::set_owner(&held.dir, (0, 0), 0o700).map_err(io)?;
            client_fs::check_readable_files(&held.dir, &held.shown, &peer, MAX_IMAGE_FILES)?;
            Ok(held)
        })
        .await
}

/// Returns a held checkpoint to its owner and mode, off the reactor (the checkpoint is on the
/// client's file system).
pub async fn give_back(caller: &Caller, held: HeldImage) {
    // A failure is logged by the drop; one past the time limit still happens in the background.
    let _ = caller
        .off_reactor("giving the checkpoint back", move || {
            drop(held);
            Ok(())
        })
        .await;
}

/// A dump directory just made and written down, removed with its entry when dropped before
/// [`MadeDump::keep`]: a request that gave up on making it (its time limit passed) drops it
/// on the blocking pool, where the hand-back drops what nobody waits for.
struct MadeDump {
    bundle: Arc<OwnedFd>,
    image: PathBuf,
    made: Option<(OwnedFd, HeldEntryFile)>,
}

impl MadeDump {
    fn keep(mut self) -> Option<(OwnedFd, HeldEntryFile)> {
        self.made.take()
    }
}

impl Drop for MadeDump {
    fn drop(&mut self) {
        if let Some((made, entry)) = self.made.take() {
            match client_fs::remove_held(&self.bundle, &self.image, made) {
                Ok(()) => entry.remove(),
                Err(e) => tracing::warn!(error = %e, "an abandoned dump directory left in place"),
            }
        }
    }
}

/// Makes `<bundle>/checkpoints/<name>` (and `checkpoints`, the caller's, when missing) beneath
/// the bundle, owned by root until [`give_to_caller`]; returns the bundle's and the new
/// directory's descriptors.
async fn create_image_dir(
    caller: &Caller,
    bundle: &Path,
    checkpoint: &Checkpoint,
    ledger: &HeldLedger,
) -> Result<(Arc<OwnedFd>, OwnedFd, HeldEntryFile)> {
    let name = &checkpoint.name;
    let fd = Arc::new(caller.open_dir("bundle", bundle).await?);
    let (peer, owned_name, bundle_fd) = (caller.peer.clone(), name.to_owned(), Arc::clone(&fd));
    let (owned_bundle, ledger) = (bundle.to_owned(), ledger.clone());
    let checkpoint = checkpoint.clone();
    let exists = format!(
        "checkpoint {name} already exists in {}",
        shown(&checkpoints_dir(bundle))
    );
    let shown_image = shown_checkpoint(bundle, name);
    let made = caller
        .off_reactor("creating the checkpoint directory", move || {
            // Before anything is made; and below again for a `checkpoints` mounted apart.
            client_fs::checkpoint_dir_not_on_fuse(&bundle_fd, &shown_image)?;
            let parent = Path::new("checkpoints");
            match client_fs::create_dir_beneath(&bundle_fd, parent, 0o700, &peer, &peer) {
                Ok(_) | Err(Error::AlreadyExists(_)) => {}
                Err(e) => return Err(e),
            }
            // berthd's until the dump is done: the caller can put nothing in it for CRIU to
            // write through.
            let image = relative(&owned_name);
            let made = match client_fs::create_dir_beneath(
                &bundle_fd,
                &image,
                0o700,
                &peer,
                &Peer::root(),
            ) {
                Err(Error::AlreadyExists(_)) => return Err(Error::AlreadyExists(exists)),
                made => made?,
            };
            if let Err(e) = client_fs::checkpoint_dir_not_on_fuse(&made, &shown_image) {
                let _ = client_fs::remove_held(&bundle_fd, &image, made);
                return Err(e);
            }
            let written = rustix::fs::fstat(&made)
                .map_err(|e| Error::io(&image, e.into()))
                .and_then(|st| {
                    ledger.write(HeldEntry {
                        bundle: owned_bundle,
                        name: owned_name,
                        dev: st.st_dev,
                        ino: st.st_ino,
                        held: Held::Dump {
                            uid: peer.uid,
                            gid: peer.gid,
                            checkpoint,
                            finished: false,
                        },
                    })
                });
            match written {
                Ok(entry) => Ok(MadeDump {
                    bundle: bundle_fd,
                    image,
                    made: Some((made, entry)),
                }),
                Err(e) => {
                    let _ = client_fs::remove_held(&bundle_fd, &image, made);
                    Err(e)
                }
            }
        })
        .await?;
    let (image, entry) = made.keep().ok_or_else(|| {
        Error::Internal("a dump directory made without its descriptor or entry".into())
    })?;
    Ok((fd, image, entry))
}

/// Writes the metadata into the dumped checkpoint and gives the directory and its files to the
/// caller, off the reactor (the bundle is on the client's file system).
async fn give_to_caller(
    caller: &Caller,
    image: OwnedFd,
    shown_image: String,
    checkpoint: Checkpoint,
    mut entry: HeldEntryFile,
) -> Result<()> {
    let peer = caller.peer.clone();
    caller
        .off_reactor("giving the checkpoint to its caller", move || {
            // A berthd killed from here on finishes this at its next start.
            if let Err(e) = entry.finish_dump() {
                tracing::warn!(error = %e, "a finished dump not written down as such");
            }
            let given = write_metadata(&image, &checkpoint)
                .and_then(|()| client_fs::give_to(&image, &shown_image, &peer));
            // Given or not, the checkpoint is the caller's: never removed at a start.
            entry.remove();
            given
        })
        .await
}

/// Writes how the checkpoint was taken into its directory (never through a link).
fn write_metadata(image: &OwnedFd, checkpoint: &Checkpoint) -> Result<()> {
    let metadata = Metadata {
        checkpoint: checkpoint.clone(),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let bytes = serde_json::to_vec_pretty(&metadata)
        .map_err(|e| Error::Internal(format!("encode checkpoint metadata: {e}")))?;
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let file = rustix::fs::openat(image, METADATA, flags, Mode::from_raw_mode(0o600))
        .map_err(|e| Error::io(METADATA, e.into()))?;
    std::fs::File::from(file)
        .write_all(&bytes)
        .map_err(|e| Error::io(METADATA, e))
}

/// The lines of a CRIU log in `work` that say why a dump or restore failed: the last errors in
/// its last 64 KiB, or its last lines when those hold no error, each cut to its ends. CRIU logs
/// at its most verbose for runc, tens of MB for a large container, and its lines quote paths.
pub fn criu_log_tail(work: &Path, log: &str) -> Option<String> {
    const LINES: usize = 8;
    const TAIL_BYTES: u64 = 64 * 1024;
    let mut file = std::fs::File::open(work.join(log)).ok()?;
    let size = file.metadata().ok()?.len();
    let start = size.saturating_sub(TAIL_BYTES);
    file.seek(std::io::SeekFrom::Start(start)).ok()?;
    let mut bytes = Vec::new();
    file.take(TAIL_BYTES).read_to_end(&mut bytes).ok()?;
    // A tail that starts inside a line keeps that line's end: it may be all the tail holds.
    let text = String::from_utf8_lossy(&bytes);
    let lines = text.lines();
    let errors: Vec<&str> = lines.clone().filter(|l| l.contains("Error (")).collect();
    let lines: Vec<&str> = if errors.is_empty() {
        lines.filter(|l| !l.trim().is_empty()).collect()
    } else {
        errors
    };
    let tail: Vec<String> = lines[lines.len().saturating_sub(LINES)..]
        .iter()
        .map(|line| crate::error::bounded(line))
        .collect();
    let tail = tail.join("\n");
    (!tail.is_empty()).then_some(tail)
}

/// One lock per key (a bundle's path for dumps, a checkpoint directory's device and inode for
/// restores), dropped from the table once nobody holds or waits for it.
pub struct Turns<K> {
    locks: std::sync::Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
}

impl<K> Default for Turns<K> {
    fn default() -> Self {
        Turns {
            locks: std::sync::Mutex::default(),
        }
    }
}

impl<K: Eq + std::hash::Hash> Turns<K> {
    pub async fn take(&self, key: K) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().expect("turns poisoned");
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
            Arc::clone(locks.entry(key).or_default())
        };
        lock.lock_owned().await
    }
}

impl Supervisor {
    /// Ok when CRIU passed `criu check` here; else FAILED_PRECONDITION with its message.
    pub(crate) async fn criu_ready(&self) -> Result<()> {
        self.runtime.criu_ready().await
    }

    /// Dumps container `id` into `<bundle>/checkpoints/<name>`. The dump is the supervisor's: a
    /// caller that goes away changes nothing about its outcome. On failure the partial directory
    /// is removed and the container keeps running.
    pub(crate) async fn checkpoint(
        self: &Arc<Self>,
        id: &str,
        checkpoint: Checkpoint,
        caller: &Caller,
    ) -> Result<()> {
        let supervisor = Arc::clone(self);
        let (id, caller) = (id.to_owned(), caller.clone());
        self.owned(caller.peer.uid, async move {
            supervisor.checkpoint_owned(&id, checkpoint, &caller).await
        })
        .await
    }

    async fn checkpoint_owned(
        &self,
        id: &str,
        checkpoint: Checkpoint,
        caller: &Caller,
    ) -> Result<()> {
        // The request's own fields first: malformed input is that on any id.
        validate_name(&checkpoint.name)?;
        let container = self.container(id)?;
        let _bundle = self.checkpoint_locks.take(container.bundle.clone()).await;
        let _operations = container.operations.lock().await;
        // Before the dump directory: nothing may fail between making it and the dump's undo.
        let work = self.scratch_dir(".criu")?;
        let (bundle_fd, image_fd, entry) =
            create_image_dir(caller, &container.bundle, &checkpoint, &self.held_ledger).await?;
        // The directory made, not its name: the caller owns `checkpoints` and could swap the
        // name for a link while CRIU writes.
        let image = client_fs::held_path(&image_fd);
        let dumped = async {
            self.criu_ready().await?;
            self.runtime
                .run(
                    Operation::Checkpoint {
                        id,
                        image: &image,
                        work: work.path(),
                        options: criu_options(&checkpoint),
                    },
                    Asker::Uid(caller.peer.uid),
                )
                .await
        }
        .await;
        if let Err(e) = dumped {
            let partial = relative(&checkpoint.name);
            let removed = caller
                .off_reactor("removing a partial checkpoint", move || {
                    client_fs::remove_held(&bundle_fd, &partial, image_fd)?;
                    // Kept otherwise: the next start of berthd tries again.
                    entry.remove();
                    Ok(())
                })
                .await;
            if let Err(removal) = removed {
                tracing::warn!(id, error = %removal, "partial checkpoint left in place");
            }
            return Err(with_criu_log(e, work.path(), "dump.log"));
        }
        let shown_image = shown_checkpoint(&container.bundle, &checkpoint.name);
        // The dump happened (with `exit`, the container is gone): what follows cannot undo it.
        let given = give_to_caller(caller, image_fd, shown_image, checkpoint.clone(), entry);
        if let Err(e) = given.await {
            tracing::warn!(id, error = %e, "checkpoint kept without its metadata or not given to its caller");
        }
        self.events.publish(
            id,
            container.init.pid(),
            EventKind::Checkpoint { checkpoint },
        );
        Ok(())
    }

    /// The checkpoints in container `id`'s bundle.
    pub(crate) async fn list_checkpoints(
        &self,
        id: &str,
        caller: &Caller,
    ) -> Result<Vec<Checkpoint>> {
        let bundle = self.container(id)?.bundle.clone();
        // A dump of the bundle ends first: its directory is not a checkpoint until it has.
        let _bundle = self.checkpoint_locks.take(bundle.clone()).await;
        list(caller, &bundle).await
    }

    /// Removes checkpoint `name` from container `id`'s bundle, as the caller may remove it.
    pub(crate) async fn delete_checkpoint(
        &self,
        id: &str,
        name: &str,
        caller: &Caller,
    ) -> Result<()> {
        validate_name(name)?;
        let container = self.container(id)?;
        let fd = Arc::new(caller.open_dir("bundle", &container.bundle).await?);
        // A restore of this directory (under whatever name) ends first: removed under it, its
        // CRIU would fail half-way. Waited for before the bundle's turn, which nothing holds
        // while it waits for a restore's.
        let (looked_up, path) = (Arc::clone(&fd), relative(name));
        let key = caller
            .off_reactor("finding the checkpoint", move || {
                Ok(client_fs::dir_id_beneath(&looked_up, &path))
            })
            .await?;
        let _restores = self.restores.take(key).await;
        let _bundle = self.checkpoint_locks.take(container.bundle.clone()).await;
        let (peer, path) = (caller.peer.clone(), relative(name));
        let missing = format!(
            "checkpoint {name} does not exist in {}",
            shown(&checkpoints_dir(&container.bundle))
        );
        caller
            .off_reactor(
                "removing the checkpoint",
                move || match client_fs::remove_beneath(&fd, &path, &peer) {
                    Err(Error::NotFound(_)) => Err(Error::NotFound(missing)),
                    removed => removed,
                },
            )
            .await
    }
}

/// Adds the tail of CRIU's log to a runtime failure: runc's own message rarely says why, and
/// the log file it names is removed with the request's scratch directory.
pub fn with_criu_log(err: Error, work: &Path, log: &str) -> Error {
    match (err, criu_log_tail(work, log)) {
        (Error::Runtime { op, message }, Some(tail)) => Error::Runtime {
            op,
            message: format!("{message}; criu's {log} (removed with the request) ends:\n{tail}"),
        },
        (err, _) => err,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use rustix::process::Uid;

    use crate::supervisor::ClientFileLimits;

    use super::*;

    /// `name` in `bundle`, for a restore in turns of its own.
    async fn open_to_restore(caller: &Caller, bundle: &Path, name: &str) -> Result<Restorable> {
        for_restore(
            caller,
            bundle,
            name,
            &RestoreTurns::default(),
            &Turns::default(),
        )
        .await
    }

    #[test]
    fn names() {
        for ok in ["a", "c1", "before-upgrade_2.0", &"x".repeat(128)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", ".", "..", "a/b", "a b", &"x".repeat(129)] {
            assert!(
                matches!(validate_name(bad), Err(Error::InvalidArgument(_))),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn metadata_round_trips_and_hand_made_directories_are_listed() {
        let bundle = tempfile::tempdir().unwrap();
        let caller = Caller::berthd(bundle.path().join("state"));
        let dir = checkpoints_dir(bundle.path());
        std::fs::create_dir_all(dir.join("taken")).unwrap();
        std::fs::create_dir_all(dir.join("by-hand")).unwrap();
        std::fs::create_dir_all(dir.join("-invalid")).unwrap();
        std::fs::write(dir.join("stray-file"), "").unwrap();
        let taken = Checkpoint {
            name: "taken".into(),
            exit: true,
            tcp: true,
            unix_sockets: false,
            shell: true,
        };
        let metadata = Metadata {
            checkpoint: taken.clone(),
            created: 1,
        };
        std::fs::write(
            dir.join("taken").join(METADATA),
            serde_json::to_vec(&metadata).unwrap(),
        )
        .unwrap();
        let listed = list(&caller, bundle.path()).await.unwrap();
        assert_eq!(
            listed,
            [
                Checkpoint {
                    name: "by-hand".into(),
                    ..Checkpoint::default()
                },
                taken
            ]
        );
        let taken = open_to_restore(&caller, bundle.path(), "taken")
            .await
            .unwrap();
        let options = taken.options;
        let (held, named) = (
            rustix::fs::fstat(&taken.image).unwrap(),
            rustix::fs::stat(dir.join("taken")).unwrap(),
        );
        assert_eq!((held.st_dev, held.st_ino), (named.st_dev, named.st_ino));
        // Held for the restore: root's and 0700 until given back, then as it was.
        let mode = |path: &Path| {
            let st = rustix::fs::lstat(path).unwrap();
            (st.st_uid, st.st_mode & 0o7777)
        };
        std::fs::set_permissions(dir.join("taken"), PermissionsExt::from_mode(0o750)).unwrap();
        rustix::fs::chown(dir.join("taken"), Some(Uid::from_raw(65534)), None).unwrap();
        let ledger = HeldLedger::in_state_dir(&bundle.path().join("state"));
        ledger.give_back_all();
        let held = hold(&caller, &taken, &ledger).await.unwrap();
        assert_eq!(mode(&dir.join("taken")), (0, 0o700));
        give_back(&caller, held).await;
        assert_eq!(mode(&dir.join("taken")), (65534, 0o750));
        // One dropped without give_back (its request gave up while it was being held) is given
        // back all the same.
        drop(hold(&caller, &taken, &ledger).await.unwrap());
        assert_eq!(mode(&dir.join("taken")), (65534, 0o750));
        // A link among the images would have CRIU read what it names: refused, and the
        // directory given back at once.
        std::os::unix::fs::symlink("/etc/shadow", dir.join("taken/pages-1.img")).unwrap();
        let linked = hold(&caller, &taken, &ledger).await.map(drop);
        assert!(
            matches!(&linked, Err(Error::InvalidArgument(m)) if m.contains("pages-1.img")),
            "{linked:?}"
        );
        assert_eq!(mode(&dir.join("taken")), (65534, 0o750));
        assert!(options.tcp_established && options.shell_job && !options.external_unix_sockets);
        assert!(matches!(
            open_to_restore(&caller, bundle.path(), "missing").await,
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            list(&caller, &bundle.path().join("nowhere")).await,
            Err(Error::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn only_its_owner_may_restore_from_a_checkpoint() {
        let bundle = tempfile::tempdir().unwrap();
        std::fs::set_permissions(bundle.path(), PermissionsExt::from_mode(0o755)).unwrap();
        let dir = checkpoints_dir(bundle.path());
        for name in ["roots", "theirs"] {
            std::fs::create_dir_all(dir.join(name)).unwrap();
            std::fs::set_permissions(dir.join(name), PermissionsExt::from_mode(0o755)).unwrap();
        }
        rustix::fs::chown(dir.join("theirs"), Some(Uid::from_raw(65534)), None).unwrap();
        let nobody = Peer {
            pid: std::process::id(),
            uid: 65534,
            gid: 65534,
            groups: Vec::new(),
        };
        let limits = ClientFileLimits {
            max_bytes: 1 << 20,
            timeout: std::time::Duration::from_secs(5),
        };
        let hand_back = crate::hand_back::HandBack::start().unwrap();
        let caller = Caller::new(
            nobody,
            bundle.path().join("state"),
            limits,
            hand_back,
            Arc::default(),
        );
        // Readable by anyone, but root's: holding it would take it from root.
        let ledger = HeldLedger::in_state_dir(&bundle.path().join("state"));
        ledger.give_back_all();
        // Refused as the checkpoint is opened, not when the restore takes it: nobody else's
        // request waits in the owner's turn.
        let refused = open_to_restore(&caller, bundle.path(), "roots")
            .await
            .map(drop);
        assert!(
            matches!(&refused, Err(Error::PermissionDenied(m)) if m.contains("belongs to uid 0")),
            "{refused:?}"
        );
        let st = rustix::fs::stat(dir.join("roots")).unwrap();
        assert_eq!((st.st_uid, st.st_mode & 0o7777), (0, 0o755));
        let theirs = open_to_restore(&caller, bundle.path(), "theirs")
            .await
            .unwrap();
        let held = hold(&caller, &theirs, &ledger).await.unwrap();
        give_back(&caller, held).await;
        let st = rustix::fs::stat(dir.join("theirs")).unwrap();
        assert_eq!((st.st_uid, st.st_mode & 0o7777), (65534, 0o755));
    }

    /// Restores of one checkpoint directory take turns under whatever name it has, until it is
    /// given back (not merely until its request is done with it); another directory's restore
    /// does not wait.
    #[tokio::test]
    async fn restores_of_one_directory_take_turns_until_it_is_given_back() {
        let bundle = tempfile::tempdir().unwrap();
        let caller = Caller::berthd(bundle.path().join("state"));
        let dir = checkpoints_dir(bundle.path());
        for name in ["first", "other"] {
            std::fs::create_dir_all(dir.join(name)).unwrap();
        }
        let ledger = HeldLedger::in_state_dir(&bundle.path().join("state"));
        ledger.give_back_all();
        let (turns, dumps) = (RestoreTurns::default(), Turns::default());
        let first = for_restore(&caller, bundle.path(), "first", &turns, &dumps)
            .await
            .unwrap();
        let held = hold(&caller, &first, &ledger).await.unwrap();
        drop(first);
        std::fs::rename(dir.join("first"), dir.join("renamed")).unwrap();
        let a_while = std::time::Duration::from_millis(100);
        let waits = |name: &'static str| {
            tokio::time::timeout(
                a_while,
                for_restore(&caller, bundle.path(), name, &turns, &dumps),
            )
        };
        let mut renamed = Box::pin(for_restore(
            &caller,
            bundle.path(),
            "renamed",
            &turns,
            &dumps,
        ));
        tokio::select! {
            _ = &mut renamed => panic!("the same directory waits"),
            () = tokio::time::sleep(a_while) => {}
        }
        // Waiting for its turn, it holds the bundle's dump turn no longer.
        tokio::time::timeout(a_while, dumps.take(bundle.path().to_owned()))
            .await
            .expect("a restore waiting for its turn holds up a dump");
        drop(renamed);
        waits("other")
            .await
            .expect("another directory does not wait")
            .unwrap();
        give_back(&caller, held).await;
        waits("renamed")
            .await
            .expect("its turn, once given back")
            .unwrap();
    }

    /// What a berthd killed while it holds checkpoint directories leaves (each hold forgotten, so
    /// nothing gives it back) is given back at the next start: a restore's to its owner and
    /// mode, an unfinished dump's removed, a finished dump's given to its caller with its
    /// metadata, and a directory replaced since left alone. Until then nothing is taken.
    /// A dump directory whose making the request gave up on (past the time limit) is dropped
    /// where nobody waits for it: it goes, with its entry, instead of staying root's.
    #[tokio::test]
    async fn a_dump_directory_given_up_on_is_removed_with_its_entry() {
        let bundle = tempfile::tempdir().unwrap();
        let state = bundle.path().join("state");
        let caller = Caller::berthd(state.clone());
        let ledger = HeldLedger::in_state_dir(&state);
        ledger.give_back_all();
        let checkpoint = Checkpoint {
            name: "abandoned".into(),
            ..Checkpoint::default()
        };
        let (bundle_fd, made, entry) =
            create_image_dir(&caller, bundle.path(), &checkpoint, &ledger)
                .await
                .unwrap();
        let entry_path = entry.path.clone();
        assert!(entry_path.exists());
        drop(MadeDump {
            bundle: bundle_fd,
            image: relative("abandoned"),
            made: Some((made, entry)),
        });
        assert!(!checkpoints_dir(bundle.path()).join("abandoned").exists());
        assert!(!entry_path.exists());
    }

    #[tokio::test]
    async fn directories_held_when_berthd_was_killed_are_given_back_at_its_next_start() {
        let bundle = tempfile::tempdir().unwrap();
        let state = bundle.path().join("state");
        let caller = Caller::berthd(state.clone());
        let ledger = HeldLedger::in_state_dir(&state);
        let dir = checkpoints_dir(bundle.path());
        for name in ["restoring", "replaced"] {
            std::fs::create_dir_all(dir.join(name)).unwrap();
            std::fs::write(dir.join(name).join("pages-1.img"), "").unwrap();
            std::fs::set_permissions(dir.join(name), PermissionsExt::from_mode(0o750)).unwrap();
            rustix::fs::chown(dir.join(name), Some(Uid::from_raw(65534)), None).unwrap();
        }
        let owner_and_mode = |path: &Path| {
            let st = rustix::fs::lstat(path).unwrap();
            (st.st_uid, st.st_mode & 0o7777)
        };
        let restorable = open_to_restore(&caller, bundle.path(), "restoring")
            .await
            .unwrap();
        let refused = hold(&caller, &restorable, &ledger).await.map(drop);
        assert!(
            matches!(&refused, Err(Error::Unavailable(m)) if m.contains("giving back")),
            "{refused:?}"
        );
        ledger.give_back_all();

        for name in ["restoring", "replaced"] {
            let restorable = open_to_restore(&caller, bundle.path(), name).await.unwrap();
            std::mem::forget(hold(&caller, &restorable, &ledger).await.unwrap());
            assert_eq!(owner_and_mode(&dir.join(name)), (0, 0o700));
        }
        // The dumps' caller, as written down: 65534, so that giving them is seen.
        let for_nobody = |entry: &mut HeldEntryFile| {
            if let Held::Dump { uid, gid, .. } = &mut entry.entry.held {
                (*uid, *gid) = (65534, 65534);
            }
        };
        let dump = |name: &str| Checkpoint {
            name: name.into(),
            exit: true,
            ..Checkpoint::default()
        };
        let (_, dumping, entry) =
            create_image_dir(&caller, bundle.path(), &dump("dumping"), &ledger)
                .await
                .unwrap();
        std::fs::write(dir.join("dumping/core-1.img"), "").unwrap();
        drop(dumping);
        std::mem::forget(entry);
        let (_, dumped, mut entry) =
            create_image_dir(&caller, bundle.path(), &dump("dumped"), &ledger)
                .await
                .unwrap();
        std::fs::write(dir.join("dumped/core-1.img"), "").unwrap();
        for_nobody(&mut entry);
        entry.finish_dump().unwrap();
        drop(dumped);
        std::mem::forget(entry);
        // Killed after its metadata was written, before it was given.
        let (_, described, mut entry) =
            create_image_dir(&caller, bundle.path(), &dump("described"), &ledger)
                .await
                .unwrap();
        for_nobody(&mut entry);
        entry.finish_dump().unwrap();
        write_metadata(&described, &dump("described")).unwrap();
        drop(described);
        std::mem::forget(entry);
        // Renamed away by its owner and another made in its place: not the one berthd held.
        std::fs::rename(dir.join("replaced"), dir.join("renamed")).unwrap();
        std::fs::create_dir(dir.join("replaced")).unwrap();
        std::fs::set_permissions(dir.join("replaced"), PermissionsExt::from_mode(0o755)).unwrap();
        let entries = || std::fs::read_dir(state.join("held")).unwrap().count();
        assert_eq!(entries(), 5);

        let restarted = HeldLedger::in_state_dir(&state);
        restarted.give_back_all();
        assert_eq!(owner_and_mode(&dir.join("restoring")), (65534, 0o750));
        assert!(
            !dir.join("dumping").exists(),
            "the unfinished dump is removed"
        );
        let listed = list(&caller, bundle.path()).await.unwrap();
        assert!(
            listed.contains(&dump("dumped")),
            "the finished dump, listed: {listed:?}"
        );
        assert!(listed.contains(&dump("described")), "{listed:?}");
        for name in ["dumped", "described"] {
            assert_eq!(
                owner_and_mode(&dir.join(name)).0,
                65534,
                "{name} given to its caller"
            );
        }
        assert_eq!(owner_and_mode(&dir.join("renamed")), (0, 0o700));
        assert_eq!(owner_and_mode(&dir.join("replaced")), (0, 0o755));
        assert_eq!(entries(), 0, "every entry is done with, given back or not");
        // A hold given back as usual leaves no entry behind.
        let restorable = open_to_restore(&caller, bundle.path(), "restoring")
            .await
            .unwrap();
        give_back(
            &caller,
            hold(&caller, &restorable, &restarted).await.unwrap(),
        )
        .await;
        assert_eq!(entries(), 0);
    }

    #[tokio::test]
    async fn metadata_larger_than_berthd_writes_is_not_read() {
        let bundle = tempfile::tempdir().unwrap();
        let caller = Caller::berthd(bundle.path().join("state"));
        let dir = checkpoints_dir(bundle.path()).join("padded");
        std::fs::create_dir_all(&dir).unwrap();
        let metadata = Metadata {
            checkpoint: Checkpoint {
                name: "padded".into(),
                exit: true,
                ..Checkpoint::default()
            },
            created: 1,
        };
        let mut json = serde_json::to_vec(&metadata).unwrap();
        std::fs::write(dir.join(METADATA), &json).unwrap();
        assert!(list(&caller, bundle.path()).await.unwrap()[0].exit);
        // Valid JSON still, padded past the limit.
        json.resize(MAX_METADATA_BYTES as usize + 1, b' ');
        std::fs::write(dir.join(METADATA), &json).unwrap();
        assert!(!list(&caller, bundle.path()).await.unwrap()[0].exit);
    }

    #[test]
    fn criu_log_tail_keeps_the_last_lines() {
        let work = tempfile::tempdir().unwrap();
        let log: String = (1..=20).map(|n| format!("line {n}\n")).collect();
        std::fs::write(work.path().join("dump.log"), log).unwrap();
        let tail = criu_log_tail(work.path(), "dump.log").unwrap();
        assert!(
            tail.starts_with("line 13") && tail.ends_with("line 20"),
            "{tail}"
        );
        let err = with_criu_log(
            Error::Runtime {
                op: "runc checkpoint".into(),
                message: "criu failed".into(),
            },
            work.path(),
            "dump.log",
        );
        assert!(err.to_string().contains("line 20"));
        assert!(criu_log_tail(work.path(), "restore.log").is_none());
        std::fs::write(
            work.path().join("restore.log"),
            "(0.1) ok\n(0.2) Error (criu/vdso.c:381): vdso: bad\n(0.3) noise after\n",
        )
        .unwrap();
        assert_eq!(
            criu_log_tail(work.path(), "restore.log").unwrap(),
            "(0.2) Error (criu/vdso.c:381): vdso: bad"
        );
        // A large log is read from its last 64 KiB, and a line quoting a long path is cut.
        let early_error = "(0.1) Error (criu/files.c:1): early\n";
        let noise = "(1.0) noise\n".repeat(200_000);
        let path = "p".repeat(20_000);
        let late = format!("(2.0) Error (criu/files-reg.c:9): ghost {path} too big\n");
        std::fs::write(
            work.path().join("dump.log"),
            format!("{early_error}{noise}{late}"),
        )
        .unwrap();
        let tail = criu_log_tail(work.path(), "dump.log").unwrap();
        assert!(
            !tail.contains("early") && tail.contains("too big"),
            "{tail}"
        );
        assert!(tail.len() < 400, "{} bytes", tail.len());
    }

    #[tokio::test]
    async fn checkpoints_of_one_bundle_take_turns() {
        let locks = Turns::default();
        let first = locks.take(Path::new("/b")).await;
        let waiting = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            locks.take(Path::new("/b")),
        );
        assert!(waiting.await.is_err(), "the same bundle waits");
        let other = locks.take(Path::new("/other")).await;
        drop((first, other));
        let _again = locks.take(Path::new("/b")).await;
        assert_eq!(
            locks.locks.lock().unwrap().len(),
            1,
            "unused locks are dropped"
        );
    }
}
