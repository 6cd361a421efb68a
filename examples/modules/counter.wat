;; counter: counts the messages on topic "count" and logs "count N" for each. It hands
;; its count to its next version with snapshot/restore, so a hot swap that loses or
;; repeats a message shows as a gap or a repeat in the logged numbers.
(module
  (import "mesh" "log" (func $log (param i32 i32)))
  (import "mesh" "subscribe" (func $subscribe (param i32 i32) (result i32)))
  (import "mesh" "msg_data" (func $msg_data (param i32 i32) (result i32)))
  (import "mesh" "snapshot_write" (func $snapshot_write (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "count")    ;; the topic, 5 bytes at 0
  (data (i32.const 16) "count ")  ;; the log prefix, 6 bytes at 16; digits follow at 22
  (global $count (mut i32) (i32.const 0))

  (func (export "init")
    (drop (call $subscribe (i32.const 0) (i32.const 5))))

  ;; Logs "count N": the digits are written backwards at 64, then copied forwards to 22.
  (func $log_count
    (local $n i32) (local $len i32) (local $i i32)
    (local.set $n (global.get $count))
    (loop $digits
      (i32.store8 (i32.add (i32.const 64) (local.get $len))
                  (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
      (local.set $len (i32.add (local.get $len) (i32.const 1)))
      (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
      (br_if $digits (local.get $n)))
    (loop $copy
      (i32.store8 (i32.add (i32.const 22) (local.get $i))
                  (i32.load8_u (i32.sub (i32.add (i32.const 63) (local.get $len)) (local.get $i))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $copy (i32.lt_u (local.get $i) (local.get $len))))
    (call $log (i32.const 16) (i32.add (i32.const 6) (local.get $len))))

  (func (export "on_message") (param $topic_len i32) (param $data_len i32)
    (global.set $count (i32.add (global.get $count) (i32.const 1)))
    (call $log_count))

  (func (export "snapshot")
    (i32.store (i32.const 128) (global.get $count))
    (drop (call $snapshot_write (i32.const 128) (i32.const 4))))

  (func (export "restore") (param $len i32)
    (drop (call $msg_data (i32.const 128) (i32.const 4)))
    (global.set $count (i32.load (i32.const 128))))
)
