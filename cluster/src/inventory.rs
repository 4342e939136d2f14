//! Slots: the places a worker process can run.

use serde::{Deserialize, Serialize};

/// One worker's place: a node and, on GPU nodes, one GPU.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Slot {
    pub node: String,
    /// Index of the slot on its node, `0..node.slots`.
    pub index: u32,
    /// The GPU this slot owns, if the node has GPUs.
    pub gpu: Option<u32>,
}

/// A machine and how many workers it takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub slots: u32,
    /// Number of GPUs; when non-zero every slot owns one, so `slots == gpus`.
    pub gpus: u32,
}

/// A node as its cluster reports it, with the worker slots it offers now
/// (0 when it takes no work: down, drained, not responding).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub cpus: u32,
    pub gpus: u32,
    pub slots: u32,
    /// The cluster's word for its state (`idle`, `mixed`, `drained`, …).
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InventoryError {
    #[error("node {node}: has no slots")]
    EmptyNode { node: String },
    #[error("node {node}: {slots} slots but {gpus} GPUs; a GPU node runs one worker per GPU")]
    GpuMismatch { node: String, slots: u32, gpus: u32 },
    #[error("node {node}: listed twice")]
    DuplicateNode { node: String },
    #[error("the inventory has no nodes")]
    Empty,
}

/// Every slot workers may be placed in, node by node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    nodes: Vec<Node>,
}

impl Inventory {
    pub fn new(nodes: Vec<Node>) -> Result<Inventory, InventoryError> {
        if nodes.is_empty() {
            return Err(InventoryError::Empty);
        }
        for (i, n) in nodes.iter().enumerate() {
            if n.slots == 0 {
                return Err(InventoryError::EmptyNode {
                    node: n.name.clone(),
                });
            }
            if n.gpus != 0 && n.gpus != n.slots {
                return Err(InventoryError::GpuMismatch {
                    node: n.name.clone(),
                    slots: n.slots,
                    gpus: n.gpus,
                });
            }
            if nodes[..i].iter().any(|m| m.name == n.name) {
                return Err(InventoryError::DuplicateNode {
                    node: n.name.clone(),
                });
            }
        }
        Ok(Inventory { nodes })
    }

    /// This machine with `slots` CPU worker processes (they may oversubscribe
    /// the cores).
    pub fn local(slots: u32) -> Result<Inventory, InventoryError> {
        Inventory::new(vec![Node {
            name: "localhost".into(),
            slots,
            gpus: 0,
        }])
    }

    /// This machine with one worker slot per GPU, GPUs `0..gpus` (as the
    /// driver numbers them without `CUDA_VISIBLE_DEVICES`).
    pub fn local_gpus(gpus: u32) -> Result<Inventory, InventoryError> {
        Inventory::new(vec![Node {
            name: "localhost".into(),
            slots: gpus,
            gpus,
        }])
    }

    /// The usable nodes of a cluster's report (`None` if there are none).
    pub fn from_status(nodes: &[NodeStatus]) -> Option<Inventory> {
        let usable: Vec<Node> = nodes
            .iter()
            .filter(|n| n.slots > 0)
            .map(|n| Node {
                name: n.name.clone(),
                slots: n.slots,
                gpus: if n.gpus > 0 { n.slots } else { 0 },
            })
            .collect();
        Inventory::new(usable).ok()
    }

    /// Whether any node has GPUs.
    pub fn has_gpus(&self) -> bool {
        self.nodes.iter().any(|n| n.gpus > 0)
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn total_slots(&self) -> u32 {
        self.nodes.iter().map(|n| n.slots).sum()
    }

    /// The slots of one node, in index order.
    pub fn slots_of(node: &Node) -> impl Iterator<Item = Slot> + '_ {
        (0..node.slots).map(move |index| Slot {
            node: node.name.clone(),
            index,
            gpu: (node.gpus > 0).then_some(index),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, slots: u32, gpus: u32) -> Node {
        Node {
            name: name.into(),
            slots,
            gpus,
        }
    }

    #[test]
    fn gpu_slots_own_one_gpu_each() {
        let inv = Inventory::new(vec![node("a", 2, 2), node("b", 3, 0)]).unwrap();
        assert_eq!(inv.total_slots(), 5);
        let a: Vec<Slot> = Inventory::slots_of(&inv.nodes()[0]).collect();
        assert_eq!(a[1].gpu, Some(1));
        let b: Vec<Slot> = Inventory::slots_of(&inv.nodes()[1]).collect();
        assert!(b.iter().all(|s| s.gpu.is_none()));
    }

    #[test]
    fn bad_inventories_name_the_node() {
        assert_eq!(
            Inventory::new(vec![node("a", 0, 0)])
                .unwrap_err()
                .to_string(),
            "node a: has no slots"
        );
        assert!(
            Inventory::new(vec![node("g", 4, 8)])
                .unwrap_err()
                .to_string()
                .contains("node g: 4 slots but 8 GPUs")
        );
        assert!(matches!(
            Inventory::new(vec![node("a", 1, 0), node("a", 1, 0)]),
            Err(InventoryError::DuplicateNode { .. })
        ));
        assert_eq!(Inventory::new(vec![]), Err(InventoryError::Empty));
    }
}
