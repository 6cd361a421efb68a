;; aggregator: subscribes to "temp", counts the readings it receives and keeps the count
;; in its persistent state (key "readings"), logging "readings N" every 8 readings
;; (N as 4 hex digits). The count survives restarts and versions through kv_get/kv_set.
(module
  (import "mesh" "log" (func $log (param i32 i32)))
  (import "mesh" "subscribe" (func $subscribe (param i32 i32) (result i32)))
  (import "mesh" "kv_get" (func $kv_get (param i32 i32 i32 i32) (result i32)))
  (import "mesh" "kv_set" (func $kv_set (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "temp")          ;; topic, 4 bytes
  (data (i32.const 8) "readings")      ;; kv key, 8 bytes
  (data (i32.const 32) "readings ")    ;; log prefix, 9 bytes; 4 hex digits follow at 41
  (data (i32.const 48) "0123456789abcdef")
  (global $count (mut i32) (i32.const 0))
  (func (export "init")
    (drop (call $subscribe (i32.const 0) (i32.const 4)))
    (if (i32.eq (call $kv_get (i32.const 8) (i32.const 8) (i32.const 96) (i32.const 4)) (i32.const 4))
      (then (global.set $count (i32.load (i32.const 96))))))
  (func (export "on_message") (param $topic_len i32) (param $data_len i32)
    (local $i i32)
    (global.set $count (i32.add (global.get $count) (i32.const 1)))
    (i32.store (i32.const 96) (global.get $count))
    (drop (call $kv_set (i32.const 8) (i32.const 8) (i32.const 96) (i32.const 4)))
    (if (i32.eqz (i32.and (global.get $count) (i32.const 7)))
      (then
        (loop $hex
          (i32.store8 (i32.add (i32.const 41) (local.get $i))
            (i32.load8_u (i32.add (i32.const 48)
              (i32.and (i32.shr_u (global.get $count) (i32.sub (i32.const 12) (i32.mul (local.get $i) (i32.const 4))))
                       (i32.const 15)))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $hex (i32.lt_u (local.get $i) (i32.const 4))))
        (call $log (i32.const 32) (i32.const 13)))))
)
