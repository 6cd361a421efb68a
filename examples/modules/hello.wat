;; hello: the smallest useful mesh module.
;;
;; `init` logs a greeting once; every `on_tick` logs "tick N" with a counter kept in a
;; global. The version is not baked in: the node stamps every log line with the module's
;; name and version, so the same source can be published as v1, v2, ...
(module
  (import "mesh" "log" (func $log (param i32 i32)))
  (memory (export "memory") 1)

  (data (i32.const 0) "hello from a mesh module")   ;; 24 bytes at 0
  (data (i32.const 32) "tick ")                     ;; 5 bytes at 32

  ;; The line for `on_tick` is assembled in memory that ends here.
  (global $line_end i32 (i32.const 128))
  (global $ticks (mut i32) (i32.const 0))

  (func (export "init")
    (call $log (i32.const 0) (i32.const 24)))

  (func (export "on_tick")
    (local $start i32)
    (global.set $ticks (i32.add (global.get $ticks) (i32.const 1)))
    ;; Digits go right before $line_end, "tick " right before the digits.
    (local.set $start
      (i32.sub (call $write_decimal (global.get $ticks) (global.get $line_end)) (i32.const 5)))
    (memory.copy (local.get $start) (i32.const 32) (i32.const 5))
    (call $log (local.get $start) (i32.sub (global.get $line_end) (local.get $start))))

  ;; Writes the decimal digits of $n so that they end just before $end; returns the
  ;; address of the first digit.
  (func $write_decimal (param $n i32) (param $end i32) (result i32)
    (local $p i32)
    (local.set $p (local.get $end))
    (loop $digit
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p)
        (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
      (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
      (br_if $digit (local.get $n)))
    (local.get $p))
)
