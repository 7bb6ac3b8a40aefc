//! Whether the kernel may store a write to a memfd in a folio larger than
//! the page written. A host page cache relies on the opposite: a page not
//! written yet must stay a hole, so a clone touching it faults to the
//! handler. With shmem THP (or a multi-size THP) policy `always`,
//! `within_size` or `force`, a `pwritev` of one 4 KiB page may allocate a
//! whole large folio, zero the rest of it and mark it up to date, and the
//! clones would then read zeros where the clone point had data. Under
//! `advise` (what `scripts/deps.sh` sets) or `never`, writes through the
//! file (no mapping advised) get 4 KiB pages.

const THP_DIR: &str = "/sys/kernel/mm/transparent_hugepage";

/// The policies that let a write without a mapping allocate large folios.
fn grants_writes(policy: &str) -> bool {
    matches!(policy, "always" | "within_size" | "force")
}

/// The selected value of a sysfs policy file (`a [b] c` → `b`).
fn selected(text: &str) -> Option<&str> {
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(&text[start..end])
}

/// The policy that makes writes allocate large folios, if any: `global` is
/// the shmem policy, `sizes` each folio size's own (`inherit` defers to the
/// global one; a global `force` overrides them all). Described for the
/// error message.
fn large_write_policy(global: Option<&str>, sizes: &[(String, String)]) -> Option<String> {
    if global == Some("force") {
        return Some("shmem_enabled = force".into());
    }
    for (size, policy) in sizes {
        if grants_writes(policy) {
            return Some(format!("{size} shmem_enabled = {policy}"));
        }
        if policy == "inherit"
            && let Some(global) = global.filter(|g| grants_writes(g))
        {
            return Some(format!(
                "{size} shmem_enabled = inherit, shmem_enabled = {global}"
            ));
        }
    }
    None
}

/// This host's policy that makes memfd writes allocate large folios, if
/// any (see the module docs).
pub(crate) fn large_write_folios() -> Option<String> {
    let read = |path: &std::path::Path| std::fs::read_to_string(path).ok();
    let global = read(std::path::Path::new(&format!("{THP_DIR}/shmem_enabled")));
    let mut sizes = Vec::new();
    if let Ok(entries) = std::fs::read_dir(THP_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("hugepages-") {
                continue;
            }
            if let Some(text) = read(&entry.path().join("shmem_enabled"))
                && let Some(policy) = selected(&text)
            {
                sizes.push((name, policy.to_string()));
            }
        }
    }
    let global = global.as_deref().and_then(selected);
    if sizes.is_empty() {
        // A kernel without per-size policies: the global one is the 2 MiB one.
        return global
            .filter(|g| grants_writes(g))
            .map(|g| format!("shmem_enabled = {g}"));
    }
    large_write_policy(global, &sizes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|&(s, p)| (s.to_string(), p.to_string()))
            .collect()
    }

    #[test]
    fn writes_get_large_folios_only_where_a_policy_grants_them_without_a_mapping() {
        let safe = sizes(&[("hugepages-2048kB", "inherit"), ("hugepages-64kB", "never")]);
        assert_eq!(large_write_policy(Some("advise"), &safe), None);
        assert_eq!(large_write_policy(Some("never"), &safe), None);
        assert_eq!(
            large_write_policy(Some("within_size"), &safe),
            Some("hugepages-2048kB shmem_enabled = inherit, shmem_enabled = within_size".into())
        );
        let small = sizes(&[("hugepages-2048kB", "never"), ("hugepages-64kB", "always")]);
        assert_eq!(
            large_write_policy(Some("advise"), &small),
            Some("hugepages-64kB shmem_enabled = always".into())
        );
        let advised = sizes(&[("hugepages-2048kB", "advise")]);
        assert_eq!(large_write_policy(Some("always"), &advised), None);
        assert_eq!(
            large_write_policy(Some("force"), &advised),
            Some("shmem_enabled = force".into()),
            "force overrides every size"
        );
        assert_eq!(
            selected("always within_size [advise] never deny force"),
            Some("advise")
        );
        assert_eq!(selected("no brackets"), None);
    }

    #[test]
    fn this_host_keeps_unwritten_cache_pages_holes() {
        // `scripts/deps.sh` sets shmem THP to `advise` on every machine that
        // runs the tests; a host page cache cannot be made otherwise.
        assert_eq!(large_write_folios(), None);
    }
}
