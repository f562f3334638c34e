use super::*;
use crate::frames::FINAL;

fn n(id: u64) -> NodeId {
    NodeId(id)
}

fn entry(owner: u64, copyset: &[u64], backup: Option<u64>) -> PageEntry {
    PageEntry {
        owner: Some(n(owner)),
        copyset: copyset.iter().map(|&i| n(i)).collect(),
        version: 4,
        backup: backup.map(n),
        lost: false,
        strays: false,
        granted: Granted::Unknown,
    }
}

#[test]
fn a_dead_sharing_owner_hands_the_page_to_a_reader() {
    let mut e = entry(1, &[1, 2, 3], None);
    assert!(repair(&mut e, |x| x == n(1), |x| x == n(1)));
    assert_eq!(e.owner, Some(n(2)));
    assert_eq!(e.copyset, [n(2), n(3)].into());
    assert!(!e.lost);
    assert!(e.strays, "the dead owner's direct readers are unknown");
}

#[test]
fn a_dead_writing_owner_falls_back_on_its_backup() {
    let mut e = entry(1, &[1], Some(3));
    assert!(repair(&mut e, |x| x == n(1), |x| x == n(1)));
    assert_eq!(e.owner, Some(n(3)));
    assert_eq!(e.copyset, [n(3)].into());
    assert_eq!(e.backup, None);
}

#[test]
fn a_dead_sole_owner_without_backup_means_a_lost_page() {
    let mut e = entry(1, &[1], Some(3));
    assert!(repair(&mut e, |x| x == n(1) || x == n(3), |x| x == n(1) || x == n(3)));
    assert!(e.lost);
    assert_eq!(e.owner, None);
}

#[test]
fn a_dead_reader_only_leaves_the_copyset() {
    let mut e = entry(1, &[1, 2], None);
    assert!(repair(&mut e, |x| x == n(2), |x| x == n(2)));
    assert_eq!(e.owner, Some(n(1)));
    assert_eq!(e.copyset, [n(1)].into());
    assert!(!e.strays);
    assert!(!repair(&mut e, |x| x == n(2), |x| x == n(2)));
}

#[test]
fn an_owner_that_left_gracefully_keeps_its_page_until_it_hands_it_over() {
    let mut e = entry(1, &[1], None);
    assert!(repair(&mut e, |x| x == n(1), |_| false));
    assert_eq!(e.owner, Some(n(1)));
    assert!(!e.lost);
}

#[test]
fn rebuild_keeps_the_newest_copies_and_their_owner() {
    let r = |h, version, owned, backup| Report {
        holder: n(h),
        version,
        owned,
        backup,
        commit: 0,
        retired: false,
        writer: None,
        backup_to: None,
        digest: 1,
    };
    let e = rebuild(
        &[r(2, 3, false, false), r(3, 5, false, false), r(4, 5, true, false), r(5, 5, false, true)],
        |_| false,
    )
    .expect("copies survive");
    assert_eq!(e.version, 5);
    assert_eq!(e.owner, Some(n(4)));
    assert_eq!(e.copyset, [n(3), n(4)].into());
    assert_eq!(e.backup, Some(n(5)));
}

#[test]
fn read_copies_of_zeros_alone_rebuild_a_page_nobody_owns() {
    let read = |h, digest| Report {
        holder: n(h),
        version: 4,
        owned: false,
        backup: false,
        commit: 0,
        retired: false,
        writer: None,
        backup_to: None,
        digest,
    };
    let zeros = digest(&[0; crate::page::PAGE_SIZE]);
    let e = rebuild(&[read(2, zeros), read(3, zeros)], |_| false).expect("copies survive");
    assert_eq!((e.owner, e.version, e.lost), (None, 4, false), "{e:?}");
    assert_eq!(e.copyset, [n(2), n(3)].into());
    // Anything else read is the page: its reader owns it.
    let e = rebuild(&[read(2, zeros), read(3, 1)], |_| false).expect("copies survive");
    assert_eq!(e.owner, Some(n(2)));
    // As does an owner's own copy of zeros, or a backup of them.
    let owned = Report { owned: true, ..read(3, zeros) };
    assert_eq!(rebuild(&[read(2, zeros), owned], |_| false).and_then(|e| e.owner), Some(n(3)));
    let backup = Report { backup: true, commit: 2, ..read(3, zeros) };
    assert_eq!(rebuild(&[read(2, zeros), backup], |_| false).and_then(|e| e.owner), Some(n(2)));
}

#[test]
fn rebuild_from_a_backup_alone_makes_it_the_owner() {
    let e = rebuild(
        &[Report {
            holder: n(6),
            version: 9,
            owned: false,
            backup: true,
            commit: 2,
            retired: false,
            writer: None,
            backup_to: None,
            digest: 1,
        }],
        |_| false,
    )
    .expect("the backup survives");
    assert_eq!((e.owner, e.version, e.backup), (Some(n(6)), 9, None));
    assert_eq!(rebuild(&[], |_| false), None);
}

#[test]
fn the_latest_commit_of_the_newest_version_wins_and_backups_that_still_disagree_are_lost() {
    let b = |h, digest| Report {
        holder: n(h),
        version: 9,
        owned: false,
        backup: true,
        commit: 4,
        retired: false,
        writer: None,
        backup_to: None,
        digest,
    };
    let agreeing = rebuild(&[b(3, 7), b(5, 7)], |_| false).expect("backups survive");
    assert!(!agreeing.lost);
    assert_eq!(agreeing.owner, Some(n(3)));
    let disagreeing = rebuild(&[b(3, 7), b(5, 8)], |_| false).expect("an entry");
    assert!(disagreeing.lost, "one of them is a stale commit: {disagreeing:?}");
    assert_eq!(disagreeing.owner, None);
    let owned = Report {
        holder: n(4),
        version: 9,
        owned: true,
        backup: false,
        commit: 0,
        retired: false,
        writer: None,
        backup_to: None,
        digest: 8,
    };
    let e = rebuild(&[b(3, 7), b(5, 8), owned], |_| false).expect("the owner's copy survives");
    assert_eq!((e.owner, e.lost), (Some(n(4)), false));
    // A backup holding an older commit of the version is a leftover: the newer one wins.
    let stale = Report { commit: 3, ..b(2, 6) };
    let e = rebuild(&[stale, b(5, 7)], |_| false).expect("backups survive");
    assert_eq!((e.owner, e.lost, e.backup), (Some(n(5)), false, None));
    let e = rebuild(&[stale, b(3, 7), b(5, 7)], |_| false).expect("backups survive");
    assert_eq!((e.owner, e.backup), (Some(n(3)), Some(n(5))), "never the stale one");
    assert_eq!(digest(&[1; 4096]), digest(&[1; 4096]));
    assert_ne!(digest(&[1; 4096]), digest(&[2; 4096]));
}

#[test]
fn a_copy_given_up_to_a_writer_that_died_too_is_never_offered_as_the_page() {
    let given = |writer| Report {
        holder: n(2),
        version: 6,
        owned: false,
        backup: true,
        commit: FINAL,
        retired: true,
        writer: Some(n(writer)),
        backup_to: None,
        digest: 1,
    };
    let dead = |x: NodeId| x == n(3);
    // The writer lives: it holds what it wrote, or never got the grant.
    let e = rebuild(&[given(4)], dead).expect("the copy survives");
    assert_eq!((e.owner, e.version, e.lost), (Some(n(2)), 6, false));
    // The writer died with its manager: what it wrote since died too.
    let e = rebuild(&[given(3)], dead).expect("an entry");
    assert!(e.lost && e.owner.is_none(), "rolled back to the copy given up: {e:?}");
    // Unless the node chosen for its backup reported, and holds nothing newer: the
    // writer's first commit goes there, so it committed nothing.
    let e = rebuild(&[Report { backup_to: Some(n(5)), ..given(3) }], dead).expect("an entry");
    assert_eq!((e.owner, e.version, e.lost), (Some(n(2)), 6, false));
    let both = |x: NodeId| x == n(3) || x == n(5);
    let e = rebuild(&[Report { backup_to: Some(n(5)), ..given(3) }], both).expect("an entry");
    assert!(e.lost, "that node died too: what the writer committed died with it");
    // Nor is an older copy left somewhere the page.
    let older = Report {
        holder: n(5),
        commit: 0,
        retired: false,
        writer: None,
        backup: false,
        version: 5,
        ..given(3)
    };
    assert!(rebuild(&[older, given(3)], dead).expect("an entry").lost);
    // A backup of the copy's version vouches that the writer committed nothing: every
    // commit reaches the backup, under a newer version, before it returns.
    let backup = Report { holder: n(5), commit: 0, retired: false, writer: None, ..given(3) };
    let e = rebuild(&[given(3), backup], dead).expect("the backup survives");
    assert_eq!((e.owner, e.version, e.lost), (Some(n(5)), 6, false));
    // Whatever its stamp: a backup placed after a promotion or a hand-over is final.
    let final_backup = Report { commit: FINAL, ..backup };
    let e = rebuild(&[given(3), final_backup], dead).expect("the backup survives");
    assert_eq!((e.owner, e.version, e.lost), (Some(n(5)), 6, false));
    // Another copy given up (its writer alive) is no backup, and vouches for nothing.
    let other = Report { holder: n(7), writer: Some(n(4)), ..given(3) };
    assert!(rebuild(&[given(3), other], dead).expect("an entry").lost);
    // Nor is it ever made the entry's backup, tied with a real one: the next write's
    // invalidation drops it, and a grant would count on a backup holding nothing.
    let e = rebuild(&[other, final_backup], dead).expect("copies");
    assert_eq!((e.owner, e.backup), (Some(n(5)), None), "the real backup is the owner");
    let e = rebuild(&[Report { holder: n(1), ..other }, final_backup], dead).expect("copies");
    assert_eq!((e.owner, e.backup), (Some(n(1)), Some(n(5))));
}
