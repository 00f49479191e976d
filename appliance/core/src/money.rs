//! Money arithmetic in fen (integer cents of a yuan): tax rates and the exact tax formula.
//! No floating point anywhere; every operation that could overflow is checked.

/// Basis points in one whole (100%).
pub const BASIS_POINTS_ONE: i128 = 10_000;
/// The legal VAT rates in basis points (0, 1%, 3%, 5%, 6%, 9%, 13%).
pub const LEGAL_RATES_BP: [u16; 7] = [0, 100, 300, 500, 600, 900, 1300];

/// A tax rate from the legal set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TaxRate(u16);

/// A rate outside [`LEGAL_RATES_BP`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("tax rate {0} bp is not a legal rate")]
pub struct IllegalTaxRate(pub u16);

impl TaxRate {
    /// Accepts only the legal rates.
    pub fn from_bp(rate_bp: u16) -> Result<Self, IllegalTaxRate> {
        if LEGAL_RATES_BP.contains(&rate_bp) {
            Ok(Self(rate_bp))
        } else {
            Err(IllegalTaxRate(rate_bp))
        }
    }
    /// The rate in basis points.
    pub fn bp(self) -> u16 {
        self.0
    }
}

/// Tax of an amount: round-half-up(|amount| x rate / 10,000), with the amount's sign.
///
/// Computed in i128 so the product never overflows; the result always fits in i64
/// because the largest rate is below 100%.
pub fn tax_fen(amount_fen: i64, rate: TaxRate) -> i64 {
    let magnitude = i128::from(amount_fen).abs();
    let tax = (magnitude * i128::from(rate.bp()) + BASIS_POINTS_ONE / 2) / BASIS_POINTS_ONE;
    debug_assert!(tax <= i128::from(i64::MAX));
    // |tax| ≤ 0.13 × 2^63 + 1, so the conversion cannot fail; saturate rather than panic.
    let tax = i64::try_from(tax).unwrap_or(i64::MAX);
    if amount_fen < 0 {
        -tax
    } else {
        tax
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legal_rates_only() {
        for bp in 0..=u16::MAX {
            assert_eq!(TaxRate::from_bp(bp).is_ok(), LEGAL_RATES_BP.contains(&bp));
        }
    }

    #[test]
    fn rounds_half_up_symmetric() {
        let r6 = TaxRate::from_bp(600).unwrap();
        // 25 fen × 6% = 1.5 fen -> 2; 24 × 6% = 1.44 -> 1.
        assert_eq!(tax_fen(25, r6), 2);
        assert_eq!(tax_fen(24, r6), 1);
        assert_eq!(tax_fen(-25, r6), -2);
        assert_eq!(tax_fen(-24, r6), -1);
        assert_eq!(tax_fen(0, r6), 0);
        let r13 = TaxRate::from_bp(1300).unwrap();
        assert_eq!(tax_fen(10_000, r13), 1_300);
        assert_eq!(
            tax_fen(i64::MAX, r13),
            // The remainder of MAX × 1300 / 10,000 is 9,100 ≥ half: rounds up.
            (i128::from(i64::MAX) * 1300 / 10_000) as i64 + 1
        );
        assert_eq!(
            tax_fen(i64::MIN, r13),
            -((i128::from(i64::MIN).abs() * 1300 + 5000) / 10_000) as i64
        );
    }
}
