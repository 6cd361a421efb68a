;; recursion: starts fine, then recurses without end on its first tick. The wasm stack
;; limit stops it with a "call stack exhausted" trap long before the host's own stack.
(module
  (memory (export "memory") 1)
  (func $down (param $n i64) (result i64)
    (i64.add (call $down (i64.add (local.get $n) (i64.const 1))) (i64.const 1)))
  (func (export "on_tick")
    (drop (call $down (i64.const 0))))
)
