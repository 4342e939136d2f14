//! Devices' peak FLOP/s: the denominator of MFU (model FLOP/s over what
//! the hardware could do). `[device] peak_tflops` says it for any device;
//! otherwise known NVIDIA data-center GPUs in bf16 (their dense tensor
//! peak, from NVIDIA's data sheets; `strata bench train` uses the same)
//! are recognized by name. A CPU, or a
//! GPU in f32, has no peak unless the recipe gives one: a guessed
//! denominator would make MFU look precise when it is not.

use strata_recipe::{Precision, Recipe};

/// Dense bf16 tensor-core peak of a known datacenter GPU, by the name its
/// driver reports, in TFLOP/s, and the datasheet it comes from.
pub fn bf16_peak_tflops(name: &str) -> Option<(f64, &'static str)> {
    strata_recipe::gpu::of_device(name).map(|g| (g.bf16_tflops, g.source))
}

/// One device's peak FLOP/s for `recipe` (`[device] peak_tflops`, or the
/// bf16 peak of the GPU `[device] gpu` names), else the bf16 peak of the
/// GPU the worker found (`gpu`, its driver's name).
pub fn device_peak_flops(recipe: &Recipe, gpu: Option<&str>) -> Option<f64> {
    if let Some(t) = recipe.device_peak_tflops() {
        return Some(t * 1e12);
    }
    let name = gpu?;
    if recipe.precision != Precision::Bf16 {
        return None;
    }
    bf16_peak_tflops(name).map(|(t, _)| t * 1e12)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(extra: &str) -> Recipe {
        Recipe::from_toml_str(
            &format!(
                "[model]\nn_layers = 1\nd_model = 16\nn_heads = 2\nd_ffn = 32\nvocab_size = 64\nmax_seq_len = 16\n[data]\ndataset = \"file:///d\"\ntokens_per_step = 64\ntotal_tokens = 640\n[optimizer]\nlr = 1e-3\n[schedule]\nkind = \"constant\"\n{extra}"
            ),
            "t",
        )
        .unwrap()
    }

    #[test]
    fn the_recipe_s_peak_wins_and_known_gpus_are_recognized() {
        let cpu = recipe("");
        assert_eq!(device_peak_flops(&cpu, None), None);
        let given = recipe("[device]\npeak_tflops = 1.5\n");
        assert_eq!(device_peak_flops(&given, None), Some(1.5e12));
        let gpu = recipe("[device]\nbackend = \"cuda\"\n");
        assert_eq!(
            device_peak_flops(&gpu, Some("NVIDIA H100 80GB HBM3")),
            Some(989.4e12)
        );
        assert_eq!(
            device_peak_flops(&gpu, Some("NVIDIA H100 PCIe")),
            Some(756e12)
        );
        assert_eq!(device_peak_flops(&gpu, Some("NVIDIA H200")), Some(989.4e12));
        assert_eq!(
            device_peak_flops(&gpu, Some("NVIDIA A100-SXM4-80GB")),
            Some(312e12)
        );
        assert_eq!(
            device_peak_flops(&gpu, Some("NVIDIA GeForce GTX 1080")),
            None
        );
        let f32_gpu = recipe("[device]\nbackend = \"cuda\"\nprecision = \"f32\"\n");
        assert_eq!(device_peak_flops(&f32_gpu, Some("NVIDIA H100")), None);
        // A GPU the recipe names gives its peak before any is found.
        let named = recipe("[device]\nbackend = \"cuda\"\ngpu = \"A100-80GB\"\n");
        assert_eq!(device_peak_flops(&named, None), Some(312e12));
        assert_eq!(named.device_memory().unwrap().0, 80.0);
    }
}
