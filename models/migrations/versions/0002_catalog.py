"""catalog: stores, categories, products, inventory, reviews, coupons

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 12:56:03.703682
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Trigram indexes below need pg_trgm (bundled with the embedded server, contrib elsewhere).
    op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    op.create_table('categories',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('parent_id', sa.Uuid(), nullable=True),
    sa.Column('slug', sa.String(length=80), nullable=False),
    sa.Column('name', sa.String(length=120), nullable=False),
    sa.Column('position', sa.Integer(), server_default='0', nullable=False),
    sa.Column('is_active', sa.Boolean(), server_default=sa.text('true'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['parent_id'], ['categories.id'], name=op.f('fk_categories_parent_id_categories'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_categories')),
    sa.UniqueConstraint('slug', name=op.f('uq_categories_slug'))
    )
    op.create_index(op.f('ix_categories_parent_id'), 'categories', ['parent_id'], unique=False)
    op.create_table('coupons',
    sa.Column('code', sa.String(length=32), nullable=False),
    sa.Column('description', sa.String(length=200), nullable=True),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('value', sa.Integer(), nullable=False),
    sa.Column('max_discount_paise', sa.Integer(), nullable=True),
    sa.Column('min_order_paise', sa.Integer(), server_default='0', nullable=False),
    sa.Column('first_order_only', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('per_user_limit', sa.Integer(), server_default='1', nullable=False),
    sa.Column('total_limit', sa.Integer(), nullable=True),
    sa.Column('valid_from', sa.DateTime(timezone=True), nullable=False),
    sa.Column('valid_until', sa.DateTime(timezone=True), nullable=False),
    sa.Column('is_active', sa.Boolean(), server_default=sa.text('true'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("(kind = 'percent' AND value BETWEEN 1 AND 10000) OR (kind = 'flat' AND value > 0)", name=op.f('ck_coupons_value')),
    sa.CheckConstraint("kind IN ('percent', 'flat')", name=op.f('ck_coupons_kind')),
    sa.CheckConstraint('code = upper(code)', name=op.f('ck_coupons_code_upper')),
    sa.CheckConstraint('max_discount_paise IS NULL OR max_discount_paise > 0', name=op.f('ck_coupons_cap')),
    sa.CheckConstraint('min_order_paise >= 0 AND per_user_limit >= 1', name=op.f('ck_coupons_limits')),
    sa.PrimaryKeyConstraint('code', name=op.f('pk_coupons'))
    )
    op.create_table('stores',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('code', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=120), nullable=False),
    sa.Column('city', sa.String(length=100), nullable=False),
    sa.Column('lat', sa.Float(), nullable=False),
    sa.Column('lng', sa.Float(), nullable=False),
    sa.Column('service_radius_km', sa.Float(), nullable=False),
    sa.Column('opens_at', sa.Time(), nullable=False),
    sa.Column('closes_at', sa.Time(), nullable=False),
    sa.Column('timezone', sa.String(length=64), server_default='Asia/Kolkata', nullable=False),
    sa.Column('is_active', sa.Boolean(), server_default=sa.text('true'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('lat BETWEEN -90 AND 90 AND lng BETWEEN -180 AND 180', name=op.f('ck_stores_coords')),
    sa.CheckConstraint('service_radius_km > 0 AND service_radius_km <= 50', name=op.f('ck_stores_radius')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_stores')),
    sa.UniqueConstraint('code', name=op.f('uq_stores_code'))
    )
    op.create_table('coupon_redemptions',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('coupon_code', sa.String(length=32), nullable=False),
    sa.Column('user_id', sa.Uuid(), nullable=False),
    sa.Column('order_id', sa.Uuid(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['coupon_code'], ['coupons.code'], name=op.f('fk_coupon_redemptions_coupon_code_coupons'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_coupon_redemptions_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_coupon_redemptions'))
    )
    op.create_index('ix_coupon_redemptions_code_user', 'coupon_redemptions', ['coupon_code', 'user_id'], unique=False)
    op.create_table('products',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('sku', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('brand', sa.String(length=80), nullable=True),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('unit', sa.String(length=40), server_default='1 pc', nullable=False),
    sa.Column('images', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False),
    sa.Column('category_id', sa.Uuid(), nullable=False),
    sa.Column('mrp_paise', sa.Integer(), nullable=False),
    sa.Column('price_paise', sa.Integer(), nullable=False),
    sa.Column('currency', sa.String(length=3), server_default='INR', nullable=False),
    sa.Column('tax_rate_bp', sa.Integer(), server_default='0', nullable=False),
    sa.Column('is_active', sa.Boolean(), server_default=sa.text('true'), nullable=False),
    sa.Column('rating_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('rating_sum', sa.Integer(), server_default='0', nullable=False),
    sa.Column('r1', sa.Integer(), server_default='0', nullable=False),
    sa.Column('r2', sa.Integer(), server_default='0', nullable=False),
    sa.Column('r3', sa.Integer(), server_default='0', nullable=False),
    sa.Column('r4', sa.Integer(), server_default='0', nullable=False),
    sa.Column('r5', sa.Integer(), server_default='0', nullable=False),
    sa.Column('search_vector', postgresql.TSVECTOR(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('mrp_paise > 0 AND price_paise > 0 AND price_paise <= mrp_paise', name=op.f('ck_products_prices')),
    sa.CheckConstraint('rating_count >= 0 AND rating_sum = r1 + 2*r2 + 3*r3 + 4*r4 + 5*r5 AND rating_count = r1 + r2 + r3 + r4 + r5', name=op.f('ck_products_rating_aggregate')),
    sa.CheckConstraint('tax_rate_bp IN (0, 500, 1200, 1800, 2800)', name=op.f('ck_products_gst_slab')),
    sa.ForeignKeyConstraint(['category_id'], ['categories.id'], name=op.f('fk_products_category_id_categories'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_products')),
    sa.UniqueConstraint('sku', name=op.f('uq_products_sku'))
    )
    op.create_index('ix_products_brand_trgm', 'products', ['brand'], unique=False, postgresql_using='gin', postgresql_ops={'brand': 'gin_trgm_ops'})
    op.create_index('ix_products_category_name', 'products', ['category_id', 'name', 'id'], unique=False)
    op.create_index('ix_products_name_trgm', 'products', ['name'], unique=False, postgresql_using='gin', postgresql_ops={'name': 'gin_trgm_ops'})
    op.create_index('ix_products_search', 'products', ['search_vector'], unique=False, postgresql_using='gin')
    op.create_table('inventory',
    sa.Column('store_id', sa.Uuid(), nullable=False),
    sa.Column('product_id', sa.Uuid(), nullable=False),
    sa.Column('on_hand', sa.Integer(), server_default='0', nullable=False),
    sa.Column('reserved', sa.Integer(), server_default='0', nullable=False),
    sa.Column('low_stock_threshold', sa.Integer(), server_default='5', nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('low_stock_threshold >= 0', name=op.f('ck_inventory_threshold')),
    sa.CheckConstraint('on_hand >= 0 AND reserved >= 0 AND reserved <= on_hand', name=op.f('ck_inventory_stock')),
    sa.ForeignKeyConstraint(['product_id'], ['products.id'], name=op.f('fk_inventory_product_id_products'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['store_id'], ['stores.id'], name=op.f('fk_inventory_store_id_stores'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('store_id', 'product_id', name=op.f('pk_inventory'))
    )
    op.create_index('ix_inventory_product', 'inventory', ['product_id'], unique=False)
    op.create_table('product_reviews',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('product_id', sa.Uuid(), nullable=False),
    sa.Column('user_id', sa.Uuid(), nullable=False),
    sa.Column('rating', sa.Integer(), nullable=False),
    sa.Column('title', sa.String(length=120), nullable=True),
    sa.Column('body', sa.String(length=2000), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('rating BETWEEN 1 AND 5', name=op.f('ck_product_reviews_rating')),
    sa.ForeignKeyConstraint(['product_id'], ['products.id'], name=op.f('fk_product_reviews_product_id_products'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_product_reviews_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_product_reviews')),
    sa.UniqueConstraint('product_id', 'user_id', name='uq_product_reviews_product_user')
    )
    op.create_index('ix_product_reviews_product_created', 'product_reviews', ['product_id', 'created_at'], unique=False)
    op.add_column('users', sa.Column('first_order_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column('users', 'first_order_at')
    op.drop_index('ix_product_reviews_product_created', table_name='product_reviews')
    op.drop_table('product_reviews')
    op.drop_index('ix_inventory_product', table_name='inventory')
    op.drop_table('inventory')
    op.drop_index('ix_products_search', table_name='products', postgresql_using='gin')
    op.drop_index('ix_products_name_trgm', table_name='products', postgresql_using='gin', postgresql_ops={'name': 'gin_trgm_ops'})
    op.drop_index('ix_products_category_name', table_name='products')
    op.drop_index('ix_products_brand_trgm', table_name='products', postgresql_using='gin', postgresql_ops={'brand': 'gin_trgm_ops'})
    op.drop_table('products')
    op.drop_index('ix_coupon_redemptions_code_user', table_name='coupon_redemptions')
    op.drop_table('coupon_redemptions')
    op.drop_table('stores')
    op.drop_table('coupons')
    op.drop_index(op.f('ix_categories_parent_id'), table_name='categories')
    op.drop_table('categories')
