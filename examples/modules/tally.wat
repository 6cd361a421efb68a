;; tally: subscribes to "temp" and counts the readings it receives in memory, nothing
;; else: a subscriber whose every message costs microseconds, so what it receives shows
;; what the mesh delivered (the node counts deliveries per module in `mesh modules`).
(module
  (import "mesh" "subscribe" (func $subscribe (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "temp")
  (global $count (mut i32) (i32.const 0))
  (func (export "init")
    (drop (call $subscribe (i32.const 0) (i32.const 4))))
  (func (export "on_message") (param $topic_len i32) (param $data_len i32)
    (global.set $count (i32.add (global.get $count) (i32.const 1))))
)
