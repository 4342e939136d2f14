//! Placement: which slot each world rank runs in.
//!
//! Ranks are placed in rank order, node by node. Because ranks are numbered
//! tensor-parallel innermost (see `strata_recipe::Layout`), a tensor-parallel
//! group is a run of consecutive ranks; placement keeps each such group on
//! one node (it exchanges activations twice per layer) and otherwise fills
//! nodes in order, so a pipeline stage's replicas and neighbouring stages sit
//! together where they fit.
//!
//! Slots already leased to running jobs are skipped: a slot, and the GPU it
//! owns, belongs to one rank of one job at a time.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use strata_cluster::{Inventory, Slot};
use strata_recipe::{Coords, Layout, Rank};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Assignment {
    pub rank: Rank,
    pub coords: Coords,
    pub slot: Slot,
}

/// Every rank of a job with its slot, in rank order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Placement {
    pub layout: Layout,
    pub assignments: Vec<Assignment>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error(
        "the job needs {needed} slots (tp·pp·dp = {layout}) but the inventory has {available}{}",
        if *.leased > 0 { format!(" free ({} leased to running jobs)", .leased) } else { String::new() }
    )]
    NotEnoughSlots {
        needed: u32,
        available: u32,
        leased: u32,
        layout: String,
    },
    #[error(
        "a tensor-parallel group of {tp} ranks must share a node, and the largest node ({node}) has {largest} slots"
    )]
    TensorGroupTooWide { tp: u32, node: String, largest: u32 },
    #[error(
        "the job needs {needed} slots in whole tensor-parallel groups of {tp}; the nodes fit only {fit} ({available} slots in all)"
    )]
    Fragmented {
        needed: u32,
        tp: u32,
        fit: u32,
        available: u32,
    },
}

/// The slots leased to live attempts, and how many on each node: free
/// slots are counted per node, not per slot.
#[derive(Debug, Default)]
pub struct Leases {
    slots: HashSet<Slot>,
    per_node: HashMap<String, u32>,
}

impl Leases {
    pub fn add(&mut self, slots: &[Slot]) {
        for s in slots {
            if self.slots.insert(s.clone()) {
                *self.per_node.entry(s.node.clone()).or_default() += 1;
            }
        }
    }

    pub fn remove(&mut self, slots: &[Slot]) {
        for s in slots {
            if self.slots.remove(s)
                && let Some(n) = self.per_node.get_mut(&s.node)
            {
                *n -= 1;
                if *n == 0 {
                    self.per_node.remove(&s.node);
                }
            }
        }
    }

    pub fn clear(&mut self) {
        self.slots.clear();
        self.per_node.clear();
    }

    pub fn slots(&self) -> &HashSet<Slot> {
        &self.slots
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Leased slots on node `name`.
    pub fn on_node(&self, name: &str) -> u32 {
        self.per_node.get(name).copied().unwrap_or(0)
    }

    /// `inventory`'s slots not leased now.
    pub fn free_on(&self, inventory: &Inventory) -> u32 {
        let leased: u32 = inventory
            .nodes()
            .iter()
            .map(|n| self.on_node(&n.name))
            .sum();
        inventory.total_slots().saturating_sub(leased)
    }
}

/// Places `layout`'s ranks on `inventory`'s slots that are not `leased`.
pub fn place(
    layout: Layout,
    inventory: &Inventory,
    leased: &HashSet<Slot>,
) -> Result<Placement, PlacementError> {
    let needed = layout.world_size();
    let leased_here = inventory
        .nodes()
        .iter()
        .flat_map(Inventory::slots_of)
        .filter(|s| leased.contains(s))
        .count() as u32;
    let available = inventory.total_slots() - leased_here;
    if needed > available {
        return Err(PlacementError::NotEnoughSlots {
            needed,
            available,
            leased: leased_here,
            layout: format!("{}·{}·{}", layout.tp, layout.pp, layout.dp),
        });
    }
    let largest = inventory
        .nodes()
        .iter()
        .reduce(|a, b| if b.slots > a.slots { b } else { a })
        .expect("an inventory has nodes");
    if layout.tp > largest.slots {
        return Err(PlacementError::TensorGroupTooWide {
            tp: layout.tp,
            node: largest.name.clone(),
            largest: largest.slots,
        });
    }
    // Free slots usable in whole tensor-parallel groups, node by node.
    let mut usable: Vec<Slot> = Vec::new();
    for node in inventory.nodes() {
        let free: Vec<Slot> = Inventory::slots_of(node)
            .filter(|s| !leased.contains(s))
            .collect();
        let whole = free.len() as u32 / layout.tp * layout.tp;
        usable.extend(free.into_iter().take(whole as usize));
    }
    if (usable.len() as u32) < needed {
        return Err(PlacementError::Fragmented {
            needed,
            tp: layout.tp,
            fit: usable.len() as u32,
            available,
        });
    }
    let assignments = usable
        .into_iter()
        .take(needed as usize)
        .enumerate()
        .map(|(r, slot)| {
            let rank = Rank(r as u32);
            Assignment {
                rank,
                coords: layout.coords(rank).expect("rank < world size"),
                slot,
            }
        })
        .collect();
    Ok(Placement {
        layout,
        assignments,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use proptest::prelude::*;
    use strata_cluster::Node;

    use super::*;

    fn inventory(sizes: &[u32]) -> Inventory {
        Inventory::new(
            sizes
                .iter()
                .enumerate()
                .map(|(i, &s)| Node {
                    name: format!("node-{i}"),
                    slots: s,
                    gpus: s,
                })
                .collect(),
        )
        .unwrap()
    }

    fn none() -> HashSet<Slot> {
        HashSet::new()
    }

    /// A second job gets the GPUs the first does not hold, never one of
    /// its; a third that does not fit is refused with the numbers.
    #[test]
    fn leased_gpus_are_never_placed_again() {
        let inv = Inventory::local_gpus(8).unwrap();
        let first = place(Layout::new(2, 1, 1), &inv, &none()).unwrap();
        let leased: HashSet<Slot> = first.assignments.iter().map(|a| a.slot.clone()).collect();
        let second = place(Layout::new(2, 1, 2), &inv, &leased).unwrap();
        let gpus: Vec<u32> = second
            .assignments
            .iter()
            .map(|a| a.slot.gpu.unwrap())
            .collect();
        assert_eq!(gpus, [2, 3, 4, 5]);
        let leased: HashSet<Slot> = leased
            .into_iter()
            .chain(second.assignments.iter().map(|a| a.slot.clone()))
            .collect();
        let e = place(Layout::new(1, 1, 4), &inv, &leased).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the job needs 4 slots (tp·pp·dp = 1·1·4) but the inventory has 2 free (6 leased to running jobs)"
        );
        // A tensor group needs its free slots on one node: one free GPU on
        // each of two nodes is two slots but no place for a pair.
        let two = inventory(&[4, 4]);
        let leased: HashSet<Slot> = two
            .nodes()
            .iter()
            .flat_map(|n| Inventory::slots_of(n).take(3))
            .collect();
        let e = place(Layout::new(2, 1, 1), &two, &leased).unwrap_err();
        assert!(
            matches!(e, PlacementError::Fragmented { fit: 0, .. }),
            "{e}"
        );
    }

    #[test]
    fn megatron_layout_on_dgx_nodes() {
        // tp 8 inside each 8-GPU node, pp 2, dp 2: four nodes, one TP group each.
        let p = place(Layout::new(8, 2, 2), &inventory(&[8, 8, 8, 8]), &none()).unwrap();
        for a in &p.assignments {
            assert_eq!(a.slot.node, format!("node-{}", a.rank.0 / 8));
            assert_eq!(a.slot.gpu, Some(a.coords.tp));
        }
    }

    #[test]
    fn local_cpu_slots() {
        let p = place(Layout::new(1, 1, 2), &Inventory::local(8).unwrap(), &none()).unwrap();
        assert_eq!(p.assignments.len(), 2);
        assert_eq!(p.assignments[1].slot.index, 1);
        assert_eq!(p.assignments[1].coords.dp, 1);
    }

    #[test]
    fn errors_show_the_numbers() {
        let e = place(Layout::new(2, 2, 4), &inventory(&[8]), &none()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the job needs 16 slots (tp·pp·dp = 2·2·4) but the inventory has 8"
        );
        let e = place(Layout::new(8, 1, 1), &inventory(&[4, 4]), &none()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a tensor-parallel group of 8 ranks must share a node, and the largest node (node-0) has 4 slots"
        );
        // 3 + 3 slots hold only two groups of 2.
        let e = place(Layout::new(2, 1, 3), &inventory(&[3, 3]), &none()).unwrap_err();
        assert!(
            matches!(e, PlacementError::Fragmented { fit: 4, .. }),
            "{e}"
        );
    }

    proptest! {
        #[test]
        fn tensor_groups_never_span_nodes(
            tp in 1u32..5, pp in 1u32..4, dp in 1u32..4,
            sizes in prop::collection::vec(1u32..17, 1..6),
        ) {
            let layout = Layout::new(tp, pp, dp);
            let inv = inventory(&sizes);
            if let Ok(p) = place(layout, &inv, &none()) {
                prop_assert_eq!(p.assignments.len() as u32, layout.world_size());
                let slots: HashSet<_> = p.assignments.iter().map(|a| a.slot.clone()).collect();
                prop_assert_eq!(slots.len(), p.assignments.len(), "a slot used twice");
                let mut group_node: HashMap<(u32, u32), String> = HashMap::new();
                for a in &p.assignments {
                    let node = group_node
                        .entry((a.coords.dp, a.coords.pp))
                        .or_insert_with(|| a.slot.node.clone());
                    prop_assert_eq!(&*node, &a.slot.node);
                }
            } else {
                // Refused only when whole TP groups truly do not fit.
                let fit: u32 = sizes.iter().map(|s| s / tp * tp).sum();
                prop_assert!(fit < layout.world_size());
            }
        }
    }
}
