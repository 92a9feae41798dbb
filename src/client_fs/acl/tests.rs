use proptest::prelude::*;

use super::*;

const UNDEFINED: u32 = u32::MAX;

/// An ACL in its xattr form, as the kernel hands it out.
fn xattr(entries: &[(u16, u32, u32)]) -> Vec<u8> {
    let mut bytes = VERSION.to_le_bytes().to_vec();
    for &(tag, perm, id) in entries {
        bytes.extend_from_slice(&tag.to_le_bytes());
        bytes.extend_from_slice(&(perm as u16).to_le_bytes());
        bytes.extend_from_slice(&id.to_le_bytes());
    }
    bytes
}

fn peer(uid: u32, groups: &[u32]) -> Peer {
    Peer {
        pid: 1,
        uid,
        gid: uid,
        groups: groups.to_vec(),
    }
}

fn acl(entries: &[(u16, u32, u32)]) -> Vec<Entry> {
    parse(&xattr(entries)).expect("a valid ACL")
}

const R: u32 = 4;
const W: u32 = 2;

/// `getfacl` of the audit's example, `app.log` owned by root:staff (50): the mask shows as the
/// group mode bits (rw), while the owning group's entry grants read only.
fn app_log() -> Vec<Entry> {
    acl(&[
        (USER_OBJ, 0o6, UNDEFINED),
        (USER, 0o6, 1001),
        (GROUP_OBJ, 0o4, UNDEFINED),
        (MASK, 0o6, UNDEFINED),
        (OTHER, 0o0, UNDEFINED),
    ])
}

#[test]
fn the_owning_groups_entry_decides_for_its_members_not_the_mask() {
    let acl = app_log();
    let bob = peer(1002, &[50]);
    assert!(grants(&acl, (0, 50), &bob, R));
    assert!(
        !grants(&acl, (0, 50), &bob, W),
        "the mask is not the group's permission"
    );
    assert!(
        grants(&acl, (0, 50), &peer(1001, &[]), R | W),
        "the named user"
    );
    assert!(!grants(&acl, (0, 50), &peer(1003, &[]), R), "others");
}

#[test]
fn a_named_user_without_permissions_is_refused_what_others_may_do() {
    let acl = acl(&[
        (USER_OBJ, 0o6, UNDEFINED),
        (USER, 0o0, 65534),
        (GROUP_OBJ, 0o6, UNDEFINED),
        (MASK, 0o6, UNDEFINED),
        (OTHER, 0o6, UNDEFINED),
    ]);
    assert!(!grants(&acl, (0, 0), &peer(65534, &[]), R));
    assert!(grants(&acl, (0, 0), &peer(1000, &[]), R | W));
}

#[test]
fn the_mask_limits_named_entries_and_the_owning_group_but_not_the_owner() {
    let acl = acl(&[
        (USER_OBJ, 0o6, UNDEFINED),
        (USER, 0o6, 1000),
        (GROUP_OBJ, 0o6, UNDEFINED),
        (GROUP, 0o6, 70),
        (MASK, 0o4, UNDEFINED),
        (OTHER, 0o0, UNDEFINED),
    ]);
    assert!(grants(&acl, (500, 60), &peer(500, &[]), R | W), "the owner");
    assert!(!grants(&acl, (500, 60), &peer(1000, &[]), W));
    assert!(grants(&acl, (500, 60), &peer(1000, &[]), R));
    assert!(!grants(&acl, (500, 60), &peer(2000, &[60]), W));
    assert!(!grants(&acl, (500, 60), &peer(2000, &[70]), W));
    assert!(grants(&acl, (500, 60), &peer(2000, &[70]), R));
}

#[test]
fn a_member_of_a_group_that_does_not_grant_is_refused_even_where_others_may() {
    let acl = acl(&[
        (USER_OBJ, 0o6, UNDEFINED),
        (GROUP_OBJ, 0o0, UNDEFINED),
        (GROUP, 0o4, 80),
        (MASK, 0o6, UNDEFINED),
        (OTHER, 0o6, UNDEFINED),
    ]);
    assert!(!grants(&acl, (0, 60), &peer(1000, &[60]), R));
    assert!(!grants(&acl, (0, 60), &peer(1000, &[80]), W));
    // Of two groups, one entry that grants all of it is enough.
    assert!(grants(&acl, (0, 60), &peer(1000, &[60, 80]), R));
    assert!(grants(&acl, (0, 60), &peer(1000, &[]), R | W));
}

#[test]
fn a_minimal_acl_is_its_mode_bits() {
    let acl = acl(&[
        (USER_OBJ, 0o6, UNDEFINED),
        (GROUP_OBJ, 0o4, UNDEFINED),
        (OTHER, 0o0, UNDEFINED),
    ]);
    assert!(grants(&acl, (5, 6), &peer(5, &[]), R | W));
    assert!(grants(&acl, (5, 6), &peer(7, &[6]), R));
    assert!(!grants(&acl, (5, 6), &peer(7, &[6]), W));
    assert!(!grants(&acl, (5, 6), &peer(7, &[]), R));
}

#[test]
fn acls_the_kernel_would_not_hold_are_not_parsed() {
    let minimal = [
        (USER_OBJ, 0o6, UNDEFINED),
        (GROUP_OBJ, 0o4, UNDEFINED),
        (OTHER, 0o0, UNDEFINED),
    ];
    assert!(parse(&xattr(&minimal)).is_some());
    let mut other_version = xattr(&minimal);
    other_version[0] = 1;
    assert!(parse(&other_version).is_none());
    let whole = xattr(&minimal);
    assert!(parse(&whole[..whole.len() - 1]).is_none(), "cut short");
    assert!(parse(&whole[..3]).is_none());
    for bad in [
        // A named user without a mask.
        &[
            (USER_OBJ, 6, UNDEFINED),
            (USER, 6, 1),
            (GROUP_OBJ, 4, UNDEFINED),
            (OTHER, 0, UNDEFINED),
        ][..],
        // Out of order.
        &[
            (GROUP_OBJ, 4, UNDEFINED),
            (USER_OBJ, 6, UNDEFINED),
            (OTHER, 0, UNDEFINED),
        ],
        // No other entry; two owners; an unknown tag; permissions beyond rwx.
        &[(USER_OBJ, 6, UNDEFINED), (GROUP_OBJ, 4, UNDEFINED)],
        &[
            (USER_OBJ, 6, UNDEFINED),
            (USER_OBJ, 6, UNDEFINED),
            (GROUP_OBJ, 4, UNDEFINED),
            (OTHER, 0, UNDEFINED),
        ],
        &[
            (USER_OBJ, 6, UNDEFINED),
            (GROUP_OBJ, 4, UNDEFINED),
            (0x40, 0, 0),
            (OTHER, 0, UNDEFINED),
        ],
        &[
            (USER_OBJ, 0o17, UNDEFINED),
            (GROUP_OBJ, 4, UNDEFINED),
            (OTHER, 0, UNDEFINED),
        ],
    ] {
        assert!(parse(&xattr(bad)).is_none(), "{bad:?}");
    }
}

/// Sets `acl` as `file`'s access ACL; false after a printed skip where the temp dir's file
/// system keeps no ACLs.
fn set_on(file: &std::path::Path, acl: &[u8]) -> bool {
    match rustix::fs::setxattr(file, ACCESS_ACL, acl, rustix::fs::XattrFlags::empty()) {
        Ok(()) => true,
        Err(Errno::OPNOTSUPP) => {
            eprintln!("skipped: the temp dir's file system keeps no ACLs");
            false
        }
        Err(e) => panic!("setxattr: {e}"),
    }
}

/// The kernel's own ACLs, read back from a file on this host's temp dir, judged as the kernel
/// judges them (checked against `setpriv` in the integration tests).
#[test]
fn an_acl_set_on_a_file_is_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, "").unwrap();
    let fd = rustix::fs::open(&file, rustix::fs::OFlags::PATH, rustix::fs::Mode::empty()).unwrap();
    assert_eq!(read(At::Fd(rustix::fd::AsFd::as_fd(&fd))), Ok(None));
    let set = xattr(&[
        (USER_OBJ, 0o6, UNDEFINED),
        (USER, 0o0, 65534),
        (GROUP_OBJ, 0o6, UNDEFINED),
        (MASK, 0o6, UNDEFINED),
        (OTHER, 0o6, UNDEFINED),
    ]);
    if !set_on(&file, &set) {
        return;
    }
    let fd = rustix::fd::AsFd::as_fd(&fd);
    let read_back = read(At::Fd(fd)).unwrap().expect("an ACL");
    assert_eq!(parse(&read_back), parse(&set));
    let dir_fd = rustix::fs::open(
        dir.path(),
        rustix::fs::OFlags::PATH,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    let entry = read(At::Entry(rustix::fd::AsFd::as_fd(&dir_fd), c"f")).unwrap();
    assert_eq!(entry, Some(read_back));
}

/// As the kernel: an ACL whose mask is empty (group mode bits 0) is not consulted, and the
/// mode bits decide, other's bits included, for a user an entry names.
#[test]
fn an_acl_with_an_empty_mask_leaves_it_to_the_mode_bits() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, "").unwrap();
    let set = xattr(&[
        (USER_OBJ, 0o6, UNDEFINED),
        (USER, 0o6, 65534),
        (GROUP_OBJ, 0o6, UNDEFINED),
        (MASK, 0o0, UNDEFINED),
        (OTHER, 0o4, UNDEFINED),
    ]);
    if !set_on(&file, &set) {
        return;
    }
    let st = rustix::fs::stat(&file).unwrap();
    assert_eq!(st.st_mode & 0o777, 0o604);
    let fd = rustix::fs::open(&file, rustix::fs::OFlags::PATH, rustix::fs::Mode::empty()).unwrap();
    let at = At::Fd(rustix::fd::AsFd::as_fd(&fd));
    let nobody = peer(65534, &[]);
    assert!(nobody.may(at, &st, R), "other's bits");
    assert!(!nobody.may(at, &st, W), "not the entry's, masked out");
}

proptest! {
    /// Bytes a file's owner chose never panic the parser.
    #[test]
    fn any_bytes_parse_or_not_without_panicking(
        bytes in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut bytes = bytes;
        if bytes.len() >= 4 {
            bytes[..4].copy_from_slice(&VERSION.to_le_bytes());
        }
        let _ = parse(&bytes);
    }

    /// Whatever ACL parses judges its owner by the owner's entry alone, and anyone by one entry:
    /// no grant goes beyond the largest permissions an entry holds.
    #[test]
    fn any_valid_acl_judges_the_owner_by_its_entry(
        entries in proptest::collection::vec((0usize..6, 0u32..8, 0u32..4), 0..8),
        uid in 0u32..4,
        groups in proptest::collection::vec(0u32..4, 0..3),
        want in 1u32..8,
    ) {
        const TAGS: [u16; 6] = [USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER];
        let mut entries: Vec<(u16, u32, u32)> = entries
            .into_iter()
            .map(|(tag, perm, id)| (TAGS[tag], perm, id))
            .collect();
        entries.sort_by_key(|&(tag, _, id)| (tag, id));
        let Some(acl) = parse(&xattr(&entries)) else {
            return Ok(());
        };
        let owner_perm = acl.iter().find(|e| e.tag == USER_OBJ).map(|e| e.perm).unwrap();
        prop_assert_eq!(grants(&acl, (1, 2), &peer(1, &groups), want), owner_perm & want == want);
        let most = acl.iter().fold(0, |all, e| all | e.perm);
        if grants(&acl, (1, 2), &peer(uid, &groups), want) {
            prop_assert_eq!(most & want, want);
        }
    }
}
