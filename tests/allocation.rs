//! No allocation churn in the training step: after a warm-up step, every pooled-size host
//! buffer a step needs comes from the buffer pool (this file holds one test, so no other
//! test in the process touches the pool's counters).

use lorafuse::checkpoint::Gpt2Config;
use lorafuse::data::{MIN_VOCAB, Task, TaskGen};
use lorafuse::lora::LoraConfig;
use lorafuse::model::Gpt2;
use lorafuse::storage::pool;
use lorafuse::train::{TrainConfig, Trainer};
use lorafuse::{DType, Device};

#[test]
fn steady_state_steps_take_every_buffer_from_the_pool() {
    let cfg = Gpt2Config {
        vocab_size: MIN_VOCAB,
        n_positions: 17,
        n_embd: 64,
        n_layer: 2,
        n_head: 4,
        layer_norm_epsilon: 1e-5,
    };
    for lora in [false, true] {
        let mut model = Gpt2::new_random(&cfg, DType::F32, &Device::Cpu, 0).unwrap();
        if lora {
            model.attach_lora(&LoraConfig::default(), 1).unwrap();
        }
        let mut t = Trainer::new(model, &TrainConfig::default()).unwrap();
        let mut r#gen = TaskGen::new(Task::A, 8, 0).unwrap();
        let b = r#gen.sample_batch(16);
        for _ in 0..2 {
            t.step(&b.tokens, &b.targets, b.batch, b.seq).unwrap();
        }
        pool::reset_stats();
        for _ in 0..3 {
            t.step(&b.tokens, &b.targets, b.batch, b.seq).unwrap();
        }
        let s = pool::stats();
        println!("lora={lora}: {s:?}");
        assert!(s.hits > 0, "the step uses pooled buffers");
        assert_eq!(
            s.misses, 0,
            "lora={lora}: a steady-state step allocated {} pooled-size buffers",
            s.misses
        );
    }
}
