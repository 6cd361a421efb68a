;; publishflood: publishes 1000 messages of 1 KiB on topic "flood" on every tick,
;; ignoring every refusal. Its publish rate quotas refuse all but a burst, so the mesh
;; carries only what the quota allows; the module itself keeps running.
(module
  (import "mesh" "publish" (func $publish (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "flood")
  (func (export "on_tick")
    (local $i i32)
    (loop $more
      (drop (call $publish (i32.const 0) (i32.const 5) (i32.const 64) (i32.const 1024)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $more (i32.lt_u (local.get $i) (i32.const 1000)))))
)
