//! strata's single-process model against an independent implementation:
//! Hugging Face `transformers`' LlamaForCausalLM and PyTorch's AdamW, as
//! recorded by `fixtures/make_llama_reference.py` (not run by CI). The same
//! weights and tokens must give the same logits, loss, every parameter's
//! gradient, gradient norms, and parameters after three clipped AdamW steps,
//! within 1e-5 relative in f32, tied and untied. This pins RoPE's
//! convention, grouped KV heads, RMSNorm's epsilon, the tied head, the loss
//! and the optimizer to the ecosystem's.

use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::AutodiffBackend;
use safetensors::SafeTensors;
use safetensors::tensor::Dtype;
use serde_json::Value;
use strata_recipe::{AdamWConfig, ModelConfig};
use strata_worker::params::ParamTable;
use strata_worker::tensors::to_vec;
use strata_worker::train::{Groups, LocalBatch, Trainer};

type Nd = Autodiff<NdArray<f32>>;
type Flex = Autodiff<burn::backend::Flex>;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/llama_reference.safetensors"
);

struct Fixture<'a> {
    st: SafeTensors<'a>,
    meta: Value,
}

impl Fixture<'_> {
    fn f32s(&self, name: &str) -> Vec<f32> {
        let t = self
            .st
            .tensor(name)
            .unwrap_or_else(|e| panic!("{FIXTURE}: tensor {name}: {e}"));
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    fn tokens(&self, case: &str) -> (Vec<usize>, Vec<u32>) {
        let t = self.st.tensor(&format!("{case}.tokens")).unwrap();
        assert_eq!(t.dtype(), Dtype::I64);
        let v = t
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
            .collect();
        (t.shape().to_vec(), v)
    }

    fn num(&self, case: &str, key: &str) -> f64 {
        self.meta[case][key]
            .as_f64()
            .unwrap_or_else(|| panic!("{FIXTURE}: {case}.{key}"))
    }
}

/// `‖a − b‖∞ / ‖b‖∞`.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(f64::from(x.abs())));
    let diff = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max(f64::from((x - y).abs())));
    diff / scale
}

/// `‖a − b‖₂ / ‖b‖₂`.
fn rel2(a: &[f32], b: &[f32]) -> f64 {
    let sq = |it: &mut dyn Iterator<Item = f64>| it.map(|x| x * x).sum::<f64>().sqrt();
    sq(&mut a.iter().zip(b).map(|(x, y)| f64::from(x - y)))
        / sq(&mut b.iter().map(|&y| f64::from(y)))
}

fn check_case<B: AutodiffBackend>(f: &Fixture<'_>, case: &str) {
    let n = |k| f.num(case, k) as u64;
    let cfg = ModelConfig {
        n_layers: n("n_layers"),
        d_model: n("d_model"),
        n_heads: n("n_heads"),
        n_kv_heads: n("n_kv_heads"),
        d_ffn: n("d_ffn"),
        vocab_size: n("vocab_size"),
        padded_vocab_size: n("vocab_size"),
        max_seq_len: n("max_seq_len"),
        rope_theta: f.num(case, "rope_theta"),
        tie_embeddings: f.meta[case]["tie_embeddings"].as_bool().unwrap(),
    };
    let adamw = AdamWConfig {
        beta1: f.num(case, "beta1"),
        beta2: f.num(case, "beta2"),
        eps: f.num(case, "eps"),
        weight_decay: f.num(case, "weight_decay"),
        grad_clip: Some(f.num(case, "grad_clip")),
    };
    let lr = f.num(case, "lr");
    let table = ParamTable::whole(&cfg);
    let values: Vec<f32> = table
        .slots
        .iter()
        .flat_map(|s| f.f32s(&format!("{case}.init.{}", s.spec.name)))
        .collect();
    let mut trainer = Trainer::<B>::from_values(
        &cfg,
        table.clone(),
        values,
        adamw,
        Groups::single(),
        Default::default(),
    )
    .keeping_grads();
    let (shape, tokens) = f.tokens(case);
    let [steps, batch, row] = shape[..] else {
        panic!("tokens of shape {shape:?}")
    };
    let seq = row - 1;
    let split = |step: usize| -> (Vec<u32>, Vec<u32>) {
        let rows = &tokens[step * batch * row..(step + 1) * batch * row];
        let inputs = rows.chunks(row).flat_map(|r| r[..seq].to_vec()).collect();
        let targets = rows.chunks(row).flat_map(|r| r[1..].to_vec()).collect();
        (inputs, targets)
    };

    let (inputs, _) = split(0);
    let logits = to_vec(trainer.model().logits(&inputs, batch, seq));
    let r = rel(&logits, &f.f32s(&format!("{case}.logits")));
    assert!(r <= 1e-5, "{case}: logits differ by {r:e}");

    let losses = f.meta[case]["losses"].as_array().unwrap();
    let norms = f.meta[case]["grad_norms"].as_array().unwrap();
    for step in 0..steps {
        let (inputs, targets) = split(step);
        let micro = [LocalBatch {
            inputs: &inputs,
            targets: &targets,
            seq_len: seq,
            groups: &[],
        }];
        let s = trainer
            .step(step as u64 + 1, &micro, (batch * seq) as u64, lr)
            .unwrap();
        let want = losses[step].as_f64().unwrap();
        let r = (s.loss - want).abs() / want;
        assert!(
            r <= 1e-5,
            "{case} step {}: loss {} vs {want} ({r:e})",
            step + 1,
            s.loss
        );
        let want = norms[step].as_f64().unwrap();
        let r = (s.grad_norm - want).abs() / want;
        assert!(
            r <= 1e-5,
            "{case} step {}: gradient norm {} vs {want} ({r:e})",
            step + 1,
            s.grad_norm
        );
        if step == 0 {
            let grads = trainer.grads();
            for slot in &table.slots {
                let name = &slot.spec.name;
                let r = rel(
                    &grads[slot.range()],
                    &f.f32s(&format!("{case}.grad.{name}")),
                );
                assert!(r <= 1e-5, "{case}: gradient of {name} differs by {r:e}");
            }
        }
    }
    // Adam divides each element's moment by its own scale, so rounding in
    // an element whose gradient is at f32's noise floor (1e-5 of its
    // tensor's largest, and near eps) shows fully in its update: after
    // three steps, compare whole tensors (‖a − b‖₂ / ‖b‖₂), and bound the
    // largest single difference looser.
    let master = trainer.master();
    for slot in &table.slots {
        let name = &slot.spec.name;
        let (ours, theirs) = (
            &master[slot.range()],
            f.f32s(&format!("{case}.step{steps}.{name}")),
        );
        let (r2, rmax) = (rel2(ours, &theirs), rel(ours, &theirs));
        assert!(
            r2 <= 1e-5 && rmax <= 5e-5,
            "{case}: {name} after {steps} steps differs by {r2:e} (2-norm), {rmax:e} (max)"
        );
    }
}

fn fixture() -> Vec<u8> {
    std::fs::read(FIXTURE).unwrap_or_else(|e| panic!("{FIXTURE}: {e}"))
}

#[test]
fn the_model_matches_hugging_face_llama_and_torch_adamw() {
    check_backend::<Nd>(&fixture());
}

/// The same fixture on burn-flex, the CPU backend workers train on.
#[test]
fn the_model_matches_them_on_flex_too() {
    check_backend::<Flex>(&fixture());
}

fn check_backend<B: AutodiffBackend>(bytes: &[u8]) {
    let (_, metadata) = SafeTensors::read_metadata(bytes).unwrap();
    let meta: Value = serde_json::from_str(
        metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get("reference"))
            .expect("the fixture's metadata"),
    )
    .unwrap();
    let f = Fixture {
        st: SafeTensors::deserialize(bytes).unwrap(),
        meta,
    };
    check_case::<B>(&f, "tied");
    check_case::<B>(&f, "untied");
}
