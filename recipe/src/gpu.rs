//! Data-center GPUs strata knows by name: each one's memory (for the
//! memory plan, when `[device] gpu` names it) and its dense bf16 tensor
//! peak (MFU's denominator, when no `[device] peak_tflops` is given).
//! Memory is the total the driver reports (`nvidia-smi`'s "Total"), where
//! it differs from the datasheet's round figure; peaks are NVIDIA's
//! datasheet figures without sparsity.

/// A GPU model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gpu {
    /// The name a recipe gives (`[device] gpu`), case-insensitive.
    pub name: &'static str,
    /// Device memory in MiB; `None` where the model ships in several sizes
    /// under one name (a recipe must then say `memory_gib`).
    pub memory_mib: Option<u64>,
    /// Dense bf16 tensor-core peak, TFLOP/s.
    pub bf16_tflops: f64,
    /// Where the figures come from.
    pub source: &'static str,
}

impl Gpu {
    pub fn memory_gib(&self) -> Option<f64> {
        self.memory_mib.map(|m| m as f64 / 1024.0)
    }
}

/// Every GPU model strata knows, by the name a recipe uses.
pub const KNOWN: &[Gpu] = &[
    Gpu {
        name: "A100-40GB",
        memory_mib: Some(40_960),
        bf16_tflops: 312.0,
        source: "NVIDIA A100 datasheet, dense bf16; 40 GiB",
    },
    Gpu {
        name: "A100-80GB",
        memory_mib: Some(81_920),
        bf16_tflops: 312.0,
        source: "NVIDIA A100 datasheet, dense bf16; 80 GiB",
    },
    Gpu {
        name: "H100",
        memory_mib: Some(81_559),
        bf16_tflops: 989.4,
        source: "NVIDIA H100 SXM datasheet, dense bf16; 81,559 MiB as the driver reports",
    },
    Gpu {
        name: "H100-PCIe",
        memory_mib: Some(81_559),
        bf16_tflops: 756.0,
        source: "NVIDIA H100 PCIe datasheet, dense bf16; 81,559 MiB as the driver reports",
    },
    Gpu {
        name: "H200",
        memory_mib: Some(143_771),
        bf16_tflops: 989.4,
        source: "NVIDIA H200 datasheet, dense bf16; 143,771 MiB as the driver reports",
    },
    Gpu {
        name: "GH200",
        memory_mib: None,
        bf16_tflops: 989.4,
        source: "NVIDIA GH200 datasheet, dense bf16 (96 or 144 GB of HBM)",
    },
    Gpu {
        name: "B200",
        memory_mib: Some(171_661),
        bf16_tflops: 2250.0,
        source: "NVIDIA B200 datasheet, dense bf16; 180 GB",
    },
];

/// The GPU a recipe's `[device] gpu` names (`h100`, `A100-80GB`, …),
/// case-insensitive.
pub fn named(name: &str) -> Option<&'static Gpu> {
    KNOWN
        .iter()
        .find(|g| g.name.eq_ignore_ascii_case(name.trim()))
}

/// The GPU behind a device name as the driver reports it ("NVIDIA H100
/// 80GB HBM3", "NVIDIA A100-SXM4-40GB"), when it is a model strata knows.
pub fn of_device(device_name: &str) -> Option<&'static Gpu> {
    let n = device_name.to_ascii_uppercase();
    let name = if n.contains("GH200") {
        "GH200"
    } else if n.contains("H200") {
        "H200"
    } else if n.contains("H100") {
        if n.contains("PCIE") {
            "H100-PCIe"
        } else {
            "H100"
        }
    } else if n.contains("A100") {
        if n.contains("40GB") {
            "A100-40GB"
        } else {
            "A100-80GB"
        }
    } else if n.contains("B200") {
        "B200"
    } else {
        return None;
    };
    named(name)
}

/// The names [`named`] takes, for errors.
pub fn known_names() -> String {
    KNOWN.iter().map(|g| g.name).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_and_recipe_names_find_the_same_gpus() {
        let of = |n: &str| of_device(n).map(|g| g.name);
        assert_eq!(of("NVIDIA H100 80GB HBM3"), Some("H100"));
        assert_eq!(of("NVIDIA H100 PCIe"), Some("H100-PCIe"));
        assert_eq!(of("NVIDIA H200"), Some("H200"));
        assert_eq!(of("NVIDIA GH200 480GB"), Some("GH200"));
        assert_eq!(of("NVIDIA A100-SXM4-40GB"), Some("A100-40GB"));
        assert_eq!(of("NVIDIA A100-SXM4-80GB"), Some("A100-80GB"));
        assert_eq!(of("NVIDIA GeForce GTX 1080"), None);
        assert_eq!(named("h100").map(|g| g.memory_mib), Some(Some(81_559)));
        assert_eq!(named(" a100-40gb ").map(|g| g.name), Some("A100-40GB"));
        assert_eq!(named("V100"), None);
        for g in KNOWN {
            assert_eq!(named(g.name), Some(g), "{} by its own name", g.name);
        }
    }
}
