//! A tiny study end to end: every table present, and bit-identical from the same seed.

use super::*;
use crate::data::{Task, TaskGen};
use crate::demo::{PhaseConfig, train_phase};

fn tiny_study(dir: &std::path::Path) -> StudyReport {
    let mcfg = crate::checkpoint::Gpt2Config {
        vocab_size: crate::data::MIN_VOCAB,
        n_positions: 9,
        n_embd: 32,
        n_layer: 2,
        n_head: 2,
        layer_norm_epsilon: 1e-5,
    };
    let base = Gpt2::new_random(&mcfg, crate::DType::F32, &Device::Cpu, 0).unwrap();
    let mut r#gen = TaskGen::new(Task::A, 4, 0).unwrap();
    let phase = PhaseConfig {
        steps: 10,
        batch: 8,
        lr: 3e-3,
        seed: 0,
        heldout: 16,
        progress: false,
    };
    let (base, _) = train_phase("pretrain", base, &mut r#gen, &phase).unwrap();
    let work = Workload::Demo { k: 4, heldout: 16 };
    let cfg = StudyConfig {
        seeds: 2,
        steps: 3,
        batch: 8,
        ranks: vec![1, 4, 16],
        top_k: 4,
        measure: false,
        progress: false,
        ..Default::default()
    };
    let r = run_study(&base, &work, &cfg, "tiny", |s, seed, _| {
        Ok(format!("{}-{seed}", s.slug()))
    })
    .unwrap();
    std::fs::create_dir_all(dir).unwrap();
    write_report(&r, dir).unwrap();
    r
}

#[test]
fn a_tiny_study_writes_every_table_and_is_bit_identical_from_the_same_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let r = tiny_study(&a);
    tiny_study(&b);
    let ja = std::fs::read(a.join("report.json")).unwrap();
    assert_eq!(
        ja,
        std::fs::read(b.join("report.json")).unwrap(),
        "report.json differs between two runs of one seed"
    );
    assert_eq!(r.table5.len(), 7);
    assert_eq!(r.table6.len(), 9);
    assert_eq!((r.fig3.len(), r.fig4.len(), r.fig8.len()), (2, 2, 2));
    assert_eq!(r.fig3[0].values.len(), 8);
    assert_eq!(r.fig3[0].values[0].len(), 16);
    assert!(!r.table7.is_empty() && !r.intruders.is_empty() && !r.claims.is_empty());
    let md = std::fs::read_to_string(a.join("report.md")).unwrap();
    for part in [
        "Table 5", "Table 6", "Eq. 4", "Table 7", "Intruder", "Headline",
    ] {
        assert!(md.contains(part), "report.md lacks {part}");
    }
    for f in [
        "fig3_wq.png",
        "fig4_wv.png",
        "fig4_random.png",
        "fig8_wq_r8.png",
        "table5_weights.csv",
        "table7_amplification.csv",
        "intruders.csv",
    ] {
        assert!(a.join(f).exists(), "{f} missing");
    }
    // The trainable fraction of the study's own model matches the shape formula.
    let own = r.fractions.last().unwrap();
    assert_eq!(own.total, gpt2_params(66, 9, 32, 2));
    assert_eq!(own.lora, lora_qv_params(32, 2, 4));
    // GPT-2 small: 124.4M parameters.
    assert_eq!(gpt2_params(50257, 1024, 768, 12), 124_439_808);
}
