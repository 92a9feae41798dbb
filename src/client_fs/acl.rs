//! POSIX access ACLs (`system.posix_acl_access`), evaluated as the kernel evaluates them.
//!
//! With an access ACL, a file's group mode bits are the ACL's mask, not its owning group's
//! permissions, and named user and group entries decide for the users and groups they name:
//! mode bits alone can grant a peer what the kernel would refuse it (a named entry with no
//! permissions) or refuse what it would grant. So, as in the kernel's `acl_permission_check`,
//! a file's owner is judged by its mode bits, anyone else by the file's ACL if it has one and
//! its group bits (the mask) are not all clear, else by the mode bits.
//!
//! Owns: reading the attribute, parsing it (a pure function over the bytes, which the file's
//! owner chose) and the permission check. Does not own: who the peer is ([`super::peer`]).

use std::ffi::CStr;
use std::os::fd::BorrowedFd;

use rustix::io::Errno;

use super::{Peer, self_fd_path};

/// The attribute a file's access ACL is kept in.
const ACCESS_ACL: &CStr = c"system.posix_acl_access";
/// The xattr format's version (`POSIX_ACL_XATTR_VERSION`).
const VERSION: u32 = 2;
/// The most entries read: far above what a file system stores (ext4 fits about 500 in a
/// block); a larger ACL is not judged and the access is refused.
const MAX_ENTRIES: usize = 1024;

const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

/// Where the file whose ACL is read is.
#[derive(Clone, Copy)]
pub enum At<'a> {
    /// Behind this descriptor (an `O_PATH` one will do).
    Fd(BorrowedFd<'a>),
    /// The entry of that name in this directory, not followed if it is a link.
    Entry(BorrowedFd<'a>, &'a CStr),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    tag: u16,
    perm: u32,
    id: u32,
}

/// The access ACL of the file `at`: `None` when it has none, or its file system keeps none.
pub fn read(at: At<'_>) -> Result<Option<Vec<u8>>, Errno> {
    // Most ACLs have a handful of entries: a small buffer first, the largest only if needed.
    let mut small = [0u8; 4 + 8 * 16];
    let n = match get(at, &mut small) {
        Ok(n) => n,
        Err(Errno::RANGE) => {
            let mut large = vec![0u8; 4 + 8 * MAX_ENTRIES];
            let n = get(at, &mut large)?;
            large.truncate(n);
            return Ok(Some(large));
        }
        Err(Errno::NODATA | Errno::OPNOTSUPP) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(Some(small[..n].to_vec()))
}

fn get(at: At<'_>, buffer: &mut [u8]) -> Result<usize, Errno> {
    match at {
        At::Fd(fd) => rustix::fs::getxattr(self_fd_path(fd), ACCESS_ACL, buffer),
        At::Entry(dir, name) => {
            let mut path = format!("{}/", self_fd_path(dir)).into_bytes();
            path.extend_from_slice(name.to_bytes());
            rustix::fs::lgetxattr(path.as_slice(), ACCESS_ACL, buffer)
        }
    }
}

/// The entries of an access ACL in its xattr form (a little-endian version, then tag,
/// permissions and id of each entry), if it is one the kernel would hold: entries in the
/// kernel's order, one owner, owning group and other entry, a mask wherever named entries are.
pub fn parse(bytes: &[u8]) -> Option<Vec<Entry>> {
    let (version, rest) = bytes.split_first_chunk::<4>()?;
    if u32::from_le_bytes(*version) != VERSION
        || rest.len() % 8 != 0
        || rest.len() / 8 > MAX_ENTRIES
    {
        return None;
    }
    let entries: Vec<Entry> = rest
        .chunks_exact(8)
        .map(|e| Entry {
            tag: u16::from_le_bytes([e[0], e[1]]),
            perm: u32::from(u16::from_le_bytes([e[2], e[3]])),
            id: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
        })
        .collect();
    let count = |tag| entries.iter().filter(|e| e.tag == tag).count();
    // The kernel keeps entries by tag; named ones of a tag in any order.
    let ordered = entries.windows(2).all(|pair| pair[0].tag <= pair[1].tag);
    let known = entries.iter().all(|e| {
        matches!(e.tag, USER_OBJ | USER | GROUP_OBJ | GROUP | MASK | OTHER) && e.perm <= 0o7
    });
    let named = count(USER) + count(GROUP) > 0;
    let whole = count(USER_OBJ) == 1
        && count(GROUP_OBJ) == 1
        && count(OTHER) == 1
        && count(MASK) <= 1
        && (!named || count(MASK) == 1);
    (ordered && known && whole).then_some(entries)
}

/// Whether the ACL `entries` of a file owned by `owner` (uid, gid) grants `peer` all of `want`
/// (`rwx` bits), as the kernel's `posix_acl_permission` decides: the owner by its entry; a named
/// user by its entry under the mask; a peer in the owning or a named group by the first such
/// entry that grants it all, under the mask, or refused if none does; anyone else by the other
/// entry.
pub fn grants(entries: &[Entry], owner: (u32, u32), peer: &Peer, want: u32) -> bool {
    let mask = entries
        .iter()
        .find(|e| e.tag == MASK)
        .map_or(0o7, |e| e.perm);
    let mut in_a_group = false;
    for entry in entries {
        match entry.tag {
            USER_OBJ if owner.0 == peer.uid => return entry.perm & want == want,
            USER if entry.id == peer.uid => return entry.perm & mask & want == want,
            GROUP_OBJ | GROUP => {
                let gid = if entry.tag == GROUP_OBJ {
                    owner.1
                } else {
                    entry.id
                };
                if peer.in_group(gid) {
                    if entry.perm & want == want {
                        return entry.perm & mask & want == want;
                    }
                    in_a_group = true;
                }
            }
            OTHER => return !in_a_group && entry.perm & want == want,
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests;
